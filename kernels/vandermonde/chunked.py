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


def chunking(length: int) -> tuple[int, int]:
    """(J, C): J = ceil(sqrt(length)) steps per chunk and C chunks, C * J >= length: two equally small tables."""
    J = math.isqrt(max(length - 1, 0)) + 1
    return J, -(-length // J)


def _complex_dtype(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def power_table(dtA: torch.Tensor, count: int, stride: int, real: torch.dtype) -> torch.Tensor:
    """(H, count, N) real: [Re | Im] of exp(dtA stride k) for k < count (N/2 each), in the working precision `real`.

    The phase step Im(dtA) stride is reduced modulo 2 pi in fp64 (an (H, N/2) tensor), so phases stay as
    exact as the working precision allows at any length; the table itself uses vectorised exp, cos and sin
    in the working precision. Decays are floored at exp(log(tiny) / 3) (2.5e-13 in fp32, 1e-103 in fp64):
    a product of two entries and a weight then stays clear of denormals, whose arithmetic (and an exp
    that underflows into them) is 5-80x slower on x86 CPUs, at an error far below the working precision.
    """
    H, half = dtA.shape
    base = dtA.detach().to(torch.complex128) * stride  # (H, N/2)
    turn = 2 * math.pi
    phase = (base.imag - turn * torch.round(base.imag / turn)).to(real).unsqueeze(-2)  # (H, 1, N/2) in [-pi, pi]
    k = torch.arange(count, device=dtA.device, dtype=real).unsqueeze(-1)  # (count, 1)
    floor = math.log(torch.finfo(real).tiny) / 3
    decay = torch.exp_((base.real.to(real).unsqueeze(-2) * k).clamp_min_(floor))  # (H, count, N/2)
    angle = phase * k
    table = torch.empty(H, count, 2 * half, device=dtA.device, dtype=real)
    torch.mul(decay, torch.cos(angle), out=table[..., :half])
    torch.mul(decay, torch.sin(angle), out=table[..., half:])
    return table


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


def vandermonde_chunked(w: torch.Tensor, dtA: torch.Tensor, length: int) -> torch.Tensor:
    """K (..., H, length) = 2 Re(sum_n w[..., h, n] exp(dtA[h, n] l)), by chunks; no autograd of its own."""
    real = dtA.real.dtype
    half = dtA.shape[-1]
    J, C = chunking(length)
    steps = power_table(dtA, J, 1, real)  # (H, J, N): [Re z^j | Im z^j]
    chunks = power_table(dtA, C, J, real)  # (H, C, N): z^(cJ)
    chunk_re, chunk_im = chunks[..., :half], chunks[..., half:]
    w_re, w_im = w.real.to(real).unsqueeze(-2), w.imag.to(real).unsqueeze(-2)  # (..., H, 1, N/2)
    # p = w z^(cJ); Re(p q) = Re p Re q - Im p Im q, so the left factor is [Re p | -Im p]
    left = torch.cat([w_re * chunk_re - w_im * chunk_im, -(w_re * chunk_im + w_im * chunk_re)], dim=-1)
    left, lead = _fold(left)  # (H, (...) C, N)
    K = _unfold(torch.matmul(left, steps.transpose(1, 2)), lead)  # (..., H, C, J)
    return 2 * K.flatten(-2)[..., :length]


def vandermonde_transpose_chunked(g: torch.Tensor, dtA: torch.Tensor) -> torch.Tensor:
    """S (..., H, N/2) = sum_l g[..., h, l] exp(dtA[h, n] l), by chunks; no autograd of its own."""
    real = dtA.real.dtype
    length, half = g.shape[-1], dtA.shape[-1]
    J, C = chunking(length)
    g = torch.nn.functional.pad(g.to(real), (0, C * J - length)).unflatten(-1, (C, J))  # (..., H, C, J)
    g, lead = _fold(g)  # (H, (...) C, J)
    M = _unfold(torch.matmul(g, power_table(dtA, J, 1, real)), lead)  # (..., H, C, N): sum_j g [Re z^j | Im z^j]
    chunks = power_table(dtA, C, J, real)  # (H, C, N): z^(cJ)
    # S = sum_c (M_re + i M_im) z^(cJ): real part pairs [M_re | M_im] with [Re z | -Im z], imaginary with [Im z | Re z]
    re = (M * torch.cat([chunks[..., :half], -chunks[..., half:]], dim=-1)).sum(-2)  # (..., H, N)
    im = (M * chunks.roll(half, dims=-1)).sum(-2)
    return torch.complex(re[..., :half] + re[..., half:], im[..., :half] + im[..., half:])  # (..., H, N/2)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum the leading (broadcast) dims of t away: (..., H, N/2) -> shape (H, N/2)."""
    return t.reshape(-1, *shape).sum(0) if t.dim() > len(shape) else t


def _with_steps_weighted(g: torch.Tensor) -> torch.Tensor:
    """g (..., H, L) -> (2, ..., H, L): g and l g_l, whose transpose products are S and dS/d(dtA) = sum_l l g_l z^l."""
    return torch.stack([g, g * torch.arange(g.shape[-1], device=g.device, dtype=g.dtype)])


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
        S, S1 = vandermonde_transpose_chunked(_with_steps_weighted(dK.to(dtA.real.dtype)), dtA)
        dw = (2 * S.conj()).to(w.dtype) if ctx.needs_input_grad[0] else None
        d_dtA = 2 * _sum_to(w.to(S1.dtype) * S1, dtA.shape).conj() if ctx.needs_input_grad[1] else None
        return dw, d_dtA, None


class VandermondeTranspose(torch.autograd.Function):
    """S = sum_l g_l exp(dtA l), saving only g and dtA; shapes as ``vandermonde_transpose``."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, dtA: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, dtA)
        return vandermonde_transpose_chunked(g, dtA)

    @staticmethod
    def backward(ctx, dS: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g, dtA = ctx.saved_tensors
        dg = d_dtA = None
        if ctx.needs_input_grad[0]:  # dL/dg_l = Re sum_n conj(dS_n) z_n^l: the forward product with w = conj(dS) / 2
            dg = vandermonde_chunked(dS.conj() / 2, dtA, g.shape[-1]).to(g.dtype)
        if ctx.needs_input_grad[1]:  # S is holomorphic in dtA, with derivative S1 = sum_l l g_l z^l
            real = dtA.real.dtype
            S1 = vandermonde_transpose_chunked(g.to(real) * torch.arange(g.shape[-1], device=g.device, dtype=real), dtA)
            d_dtA = _sum_to(dS * S1.conj(), dtA.shape)
        return dg, d_dtA
