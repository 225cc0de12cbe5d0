"""The Vandermonde products of a diagonal SSM as batched matmuls over chunks, without (H, N/2, L) tables.

With l = cJ + j (chunk c of J steps), exp(dtA l) = exp(dtA cJ) exp(dtA j), so

    K[h, cJ + j] = 2 Re sum_n (w_n exp(dtA_n cJ)) exp(dtA_n j)

is an (H, C, N) x (H, N, J) real matmul of two small tables: (H, C, N/2) chunk powers folded into w
and (H, J, N/2) step powers. The transpose product S_n = sum_l g_l exp(dtA_n l) is the same matmul
the other way round. Each is the other's adjoint, so each backward is the other's forward: the
autograd Functions save only w (or g) and dtA and rebuild the tables in backward. The math and the
gradient formulas are in README.md.
"""

from __future__ import annotations

import math

import torch


def chunking(length: int, rows: int = 1) -> tuple[int, int]:
    """(J, C): J steps per chunk and C = ceil(length / J) chunks.

    The step table costs ~J and the chunk sums ~rows x C per mode, so J = ceil(sqrt(rows x length)) (at most
    the length) balances them: sqrt(L) for one kernel, longer chunks for a batch of states (prefill).
    """
    J = min(max(length, 1), math.isqrt(max(rows * length - 1, 0)) + 1)
    return J, -(-length // J)


def _factors(count: int) -> tuple[int, int]:
    """(K1, K2) with K1 K2 >= count and K2 ~ sqrt(count): an exact factorisation where one is near, so that the
    table needs no slice (a contiguous (H, count, N/2) result saves the copy a sliced one costs its readers)."""
    K2 = math.isqrt(max(count - 1, 0)) + 1
    for exact in range(K2, min(count, 2 * K2) + 1):
        if count % exact == 0:
            return count // exact, exact
    return -(-count // K2), K2


def _powers(dtA: torch.Tensor, count: int, stride: int, real: torch.dtype) -> torch.Tensor:
    """exp(dtA stride k) for k < count: (H, count, N/2) complex in the working precision.

    The phase step Im(dtA) stride is reduced modulo 2 pi in fp64 first ((H, N/2) numbers), so phases stay as
    exact as the working precision allows at any stride. Decays are floored at exp(log(tiny)/4) (3e-10 in
    fp32, 1e-77 in fp64): a product of two entries and a weight then stays clear of denormals, whose
    arithmetic (and an exp that underflows into them) ran 5-80x slower on the development CPU, at an error
    far below the working precision.
    """
    k = torch.arange(count, device=dtA.device, dtype=real).unsqueeze(-1)  # (count, 1)
    return exp_multiples((dtA.detach().to(torch.complex128) * stride).unsqueeze(-2), k, real)


def exp_multiples(step: torch.Tensor, k: torch.Tensor, real: torch.dtype) -> torch.Tensor:
    """exp(step k) complex in `real`'s precision, step complex128 and k real broadcast against each other (the
    caller's shapes pick the layout), with ``_powers``' phase reduction and decay floor."""
    turn = 2 * math.pi
    a, b = step.real.to(real), (step.imag - turn * torch.round(step.imag / turn)).to(real)
    decay = torch.exp_((a * k).clamp_min_(math.log(torch.finfo(real).tiny) / 4))
    angle = b * k
    return torch.complex(decay * torch.cos(angle), decay * torch.sin(angle))


def _outer(coarse: torch.Tensor, fine: torch.Tensor, count: int) -> torch.Tensor:
    """(..., H, K1, N/2) x (H, K2, N/2) -> (..., H, count, N/2): entry k1 K2 + k2 is coarse[k1] fine[k2]."""
    table = (coarse.unsqueeze(-2) * fine.unsqueeze(-3)).flatten(-3, -2)  # (..., H, K1 K2, N/2)
    return table if table.shape[-2] == count else table[..., :count, :]


def _table_factors(dtA: torch.Tensor, count: int, stride: int, real: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(coarse, fine) factors of the power table exp(dtA stride k), k < count (``power_table`` says how)."""
    K1, K2 = _factors(count)
    return _powers(dtA, K1, stride * K2, real), _powers(dtA, K2, stride, real)


def power_table(dtA: torch.Tensor, count: int, stride: int, real: torch.dtype) -> torch.Tensor:
    """(H, count, N/2) complex: exp(dtA stride k) for k < count, complex64 (complex128 when `real` is fp64).

    The outer product of two tables of ~sqrt(count) entries, exp(dtA stride k1 K2) and exp(dtA stride k2)
    with k = k1 K2 + k2, so exp, cos and sin run on 2 sqrt(count) numbers per mode and the table costs one
    complex multiply; phases exact to the working precision at any length (``_powers``).
    """
    return _outer(*_table_factors(dtA, count, stride, real), count)


def _interleaved(z: torch.Tensor) -> torch.Tensor:
    """complex (..., N/2) -> real (..., N) as [Re z_0, Im z_0, Re z_1, ...] (a view of a contiguous z)."""
    return torch.view_as_real(z).flatten(-2)


def _fold(t: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """(..., H, R, X) -> (H, (...) * R, X) for one batched matmul over H, and the leading shape to undo it."""
    lead = t.shape[:-3]
    if not lead:
        return t, lead
    return t.movedim(-3, 0).reshape(t.shape[-3], -1, t.shape[-1]), lead


def _unfold(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """The inverse of ``_fold``: (H, (...) * R, X) -> (..., H, R, X)."""
    if not lead:
        return t
    return t.view(t.shape[0], *lead, -1, t.shape[-1]).movedim(0, -3)


def _full_precision(fn):
    """Run fn with autocast off: its matmuls must stay in the SSM's precision (fp32 or fp64), not bf16."""

    def wrapped(first: torch.Tensor, dtA: torch.Tensor, *args, **kwargs):
        with torch.autocast(dtA.device.type, enabled=False):
            return fn(first, dtA, *args, **kwargs)

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_full_precision
def vandermonde_chunked(w: torch.Tensor, dtA: torch.Tensor, length: int) -> torch.Tensor:
    """K (..., H, length) = 2 Re(sum_n w[..., h, n] exp(dtA[h, n] l)), by chunks; no autograd of its own."""
    real = dtA.real.dtype
    J, C = chunking(length, w[..., 0, 0].numel())
    steps = _interleaved(power_table(dtA, J, 1, real).contiguous())  # (H, J, N): z^j as (re, im) pairs
    # Re(p q) = Re p Re q + (-Im p) Im q: the left factor holds conj(2 w z^(cJ)) = 2 conj(w) conj(z)^(cJ) as
    # (re, im) pairs, the conjugate and the factor 2 folded into the small factors, not passes over the table
    chunks_coarse, chunks_fine = _table_factors(dtA, C, J, real)
    weighted = (2 * w.conj()).to(chunks_coarse.dtype).unsqueeze(-2) * chunks_coarse.conj()  # (..., H, K1, N/2)
    chunk_weights = _outer(weighted, chunks_fine.conj(), C)  # (..., H, C, N/2)
    left, lead = _fold(_interleaved(chunk_weights))  # (H, (...) C, N)
    K = _unfold(torch.matmul(left, steps.transpose(1, 2)), lead)  # (..., H, C, J)
    return K.flatten(-2)[..., :length]


def transpose_tables(dtA: torch.Tensor, length: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The power tables the transpose product of ``rows`` sequences of ``length`` steps reads: z^j for j < J as
    (re, im) pairs (H, J, N), and z^(cJ) for c < C (H, 1, C, N/2), (J, C) = ``chunking(length, rows)``.

    They depend on dtA alone, so a caller running many products with the same weights (the prefills of
    decoding) can keep them instead of rebuilding them (about half of a prefill state's cost).
    """
    real = dtA.real.dtype
    J, C = chunking(length, rows)
    steps = _interleaved(power_table(dtA, J, 1, real).contiguous())  # (H, J, N)
    return steps, power_table(dtA, C, J, real).unsqueeze(1)  # (H, 1, C, N/2)


@_full_precision
def vandermonde_transpose_chunked(g: torch.Tensor, dtA: torch.Tensor, weighted: bool = False,
                                  tables: tuple[torch.Tensor, torch.Tensor] | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S (..., H, N/2) = sum_l g[..., h, l] exp(dtA[h, n] l) by chunks, no autograd of its own; with `weighted`
    also S1 = sum_l l g_l exp(dtA l) (= dS/d(dtA)) from the same matmul, else None. ``tables``: what
    ``transpose_tables(dtA, L, rows)`` returns for g's length and rows, if the caller keeps them."""
    real = dtA.real.dtype
    length, half = g.shape[-1], dtA.shape[-1]
    steps, chunks = tables if tables is not None else transpose_tables(dtA, length, g[..., 0, 0].numel())
    J, C = steps.shape[1], chunks.shape[2]  # (H, J, N), (H, 1, C, N/2): z^(cJ)
    H, rows = dtA.shape[0], g[..., 0, 0].numel()
    # the rows of g (and with `weighted` also l g_l beside each), laid out for one batched matmul over H,
    # in chunks of J with zeros past the end: (H, rows, [2], C J)
    seqs = g.new_empty((H, rows) + (2,) * weighted + (C * J,), dtype=real)
    if C * J > length:
        seqs[..., length:] = 0
    g_rows = g.reshape(rows, H, length).transpose(0, 1)  # (H, rows, L)
    if weighted:
        seqs[:, :, 0, :length] = g_rows
        torch.mul(g_rows, torch.arange(length, device=g.device, dtype=real), out=seqs[:, :, 1, :length])
    else:
        seqs[..., :length] = g_rows
    M = torch.matmul(seqs.view(H, -1, J), steps)  # (H, rows [2] C, N): sum_j g z^j per chunk as (re, im) pairs
    M = torch.view_as_complex(M.unflatten(-1, (-1, 2))).view(H, -1, C, half)  # (H, rows [2], C, N/2)
    # the chunks' sums, each weighted by its power z^(cJ): (H, rows [2], C, N/2) -> (rows, [2], H, N/2)
    S = (M * chunks).sum(-2).view(H, rows, -1, half).movedim(0, 2)
    shape = (*g.shape[:-1], half)  # (..., H, N/2)
    return (S[:, 0].reshape(shape), S[:, 1].reshape(shape)) if weighted else (S.reshape(shape), None)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum the leading (broadcast) dims of t away: (..., H, N/2) -> shape (H, N/2)."""
    return t.reshape(-1, *shape).sum(0) if t.dim() > len(shape) else t


class Vandermonde(torch.autograd.Function):
    """K = 2 Re(sum_n w_n exp(dtA_n l)), saving only w and dtA; shapes as ``vandermonde``."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, dtA: torch.Tensor, length: int) -> torch.Tensor:
        ctx.save_for_backward(w, dtA)
        return vandermonde_chunked(w, dtA, length)

    @staticmethod
    def backward(ctx, dK: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        w, dtA = ctx.saved_tensors
        # dK_l/dRe w = 2 Re z^l, dK_l/dIm w = -2 Im z^l; dK_l/d(dtA) = 2 Re(l w z^l): both from one transpose product
        S, S1 = vandermonde_transpose_chunked(dK, dtA, weighted=True)
        dw = (2 * S.conj()).to(w.dtype) if ctx.needs_input_grad[0] else None
        d_dtA = 2 * _sum_to(w.to(S1.dtype) * S1, dtA.shape).conj() if ctx.needs_input_grad[1] else None
        return dw, d_dtA, None


class VandermondeTranspose(torch.autograd.Function):
    """S = sum_l g_l exp(dtA l), saving only g and dtA; shapes as ``vandermonde_transpose``."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, dtA: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, dtA)
        return vandermonde_transpose_chunked(g, dtA)[0]

    @staticmethod
    def backward(ctx, dS: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g, dtA = ctx.saved_tensors
        dg = d_dtA = None
        if ctx.needs_input_grad[0]:  # dL/dg_l = Re sum_n conj(dS_n) z_n^l: the forward product with w = conj(dS) / 2
            dg = vandermonde_chunked(dS.conj() / 2, dtA, g.shape[-1]).to(g.dtype)
        if ctx.needs_input_grad[1]:  # S is holomorphic in dtA, with derivative S1 = sum_l l g_l z^l
            S1 = vandermonde_transpose_chunked(g, dtA, weighted=True)[1]
            d_dtA = _sum_to(dS * S1.conj(), dtA.shape)
        return dg, d_dtA
