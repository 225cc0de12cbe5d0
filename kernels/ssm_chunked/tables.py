"""The chunked SSM's (H, J, .) tables from dtA, w = C dB and D, as one autograd Function with its own backward.

With z = exp(dtA) per mode and P_k = z^k:

    E[:, i] = P_(J-i) as (re, im) pairs          (a chunk's input i -> its state at the chunk's end)
    T[:, i, j] = K[j - i] for j >= i, else 0, plus D at j = i    (input i -> within-chunk output j)
    R[:, j] = conj(2 w P_j) as pairs             (the state entering a chunk -> its output j)
    zJ = P_J,    K[l] = 2 Re sum_n w P_l = sum_n Re R[l, n]

Each table is written once, contiguous: P_k = A_(k1) F_(k2) for k = k1 K2 + k2, with coarse A_(k1) = z^(k1 K2)
and fine F_(k2) = z^(k2) (exp, cos and sin on K1 + K2 ~ 2 sqrt(J) numbers per mode,
``vandermonde.chunked._powers``), so E and R are one outer product of two small tables (E from the factors read
backwards); T is a flipped unfold of [0] * J + K. Autograd through the power table, a flip, a cat, the
Toeplitz matrix's index_select and complex views had taken 1.6-1.9x this Function's time forward and
backward (256 and 1024 channels, J 32 and 64, one thread on the 2-core VM).

Backward, in PyTorch's convention for complex gradients (dL/dRe + i dL/dIm), with dE, dR as complex numbers:

    dK_l  = sum_i dT[i, i + l]  (diagonal sums),   dD = dK_0,   g_j = dR_j + dK_j  (the taps read Re R)
    dw    = 2 conj(sum_j P_j g_j)
    d dtA = sum_i (J - i) conj(P_(J-i)) dE_i + conj(2 w sum_j j P_j g_j) + J conj(zJ) dzJ

(every table is holomorphic in dtA, d P_k / d dtA = k P_k). The sums over j are one product with the rebuilt
table and a (2, J) matmul of weights [1, j]; the diagonal sums one masked sum over a skewed view of dT (no
index_add). The tables are computed power-major, (J, H, .), and handed over as (H, J, .) views.
"""

from __future__ import annotations

import torch

from hybrid_pretrain.kernels.vandermonde.chunked import _factors, exp_multiples


def _split(J: int) -> tuple[int, int]:
    """(K1, K2) with K1 K2 = J and K2 ~ sqrt(J) where such a divisor is near, else (J, 1)."""
    K1, K2 = _factors(J)
    return (K1, K2) if K1 * K2 == J else (J, 1)


def _factors_of(dtA: torch.Tensor, K1: int, K2: int, real: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The power table's factors, power-major: coarse z^(k1 K2) for k1 < K1 (K1, H, N/2) and fine z^k2 for
    k2 <= K2 (K2 + 1, H, N/2), complex.

    ``vandermonde.chunked.exp_multiples`` (as its ``_powers``: phases reduced modulo 2 pi in fp64, decays floored)
    for both strides at once, with the power first: elementwise ops then run over H N/2 contiguous numbers per
    power instead of N/2 at a time, and so do the products that build the tables from them.
    """
    count = max(K1, K2 + 1)
    steps = dtA.detach().to(torch.complex128) * torch.tensor([K2, 1], device=dtA.device).view(2, 1, 1)  # (2, H, N/2)
    k = torch.arange(count, device=dtA.device, dtype=real).view(count, 1, 1)
    powers = exp_multiples(steps.unsqueeze(1), k, real)  # (2, count, H, N/2)
    return powers[0, :K1], powers[1, :K2 + 1]


def _pairs(coarse: torch.Tensor, fine: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """coarse (M, K1, H, N/2), fine (M, K2, H, N/2) complex -> M tables (H, K1 K2, N) real: coarse[m, k1] fine[m, k2]
    as (re, im) pairs, views of one power-major (M, K1 K2, H, N) product (matmul operands with leading dimension
    H N)."""
    M, K1, H, half = coarse.shape
    table = coarse.unsqueeze(2) * fine.unsqueeze(1)  # (M, K1, K2, H, N/2)
    return torch.view_as_real(table).view(M, -1, H, 2 * half).transpose(1, 2).unbind(0)


def _weighted_sums(weights: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """weights (W, J) or (H, W, J), pairs (H, J, N) -> (H, W, N/2) complex: sum_j weight_j x_j, one batched matmul."""
    H, J, N = pairs.shape
    out = torch.bmm(weights.expand(H, -1, J), pairs)  # (H, W, N)
    return torch.view_as_complex(out.view(H, -1, N // 2, 2))


def _as_complex(pairs: torch.Tensor) -> torch.Tensor:
    """(H, J, N) real pairs -> (H, J, N/2) complex, a view (a copy if its layout does not allow one)."""
    pairs = pairs.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(s % 2 for s in pairs.stride()[:-1]) or pairs.storage_offset() % 2:
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def _with_conj_E(first: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first fine[k2] as pairs, conj(E)): the power table with the coarse factor `first` (coarse itself, or
    2 w coarse), and conj(P_(J-i)) from the conjugated factors read backwards, in one product."""
    K2 = fine.shape[0] - 1
    return _pairs(torch.stack([first, coarse.flip(0).conj_physical()]),
                  torch.stack([fine[:K2], fine[1:].flip(0).conj_physical()]))


def backward_tables(w: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor, band: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``core.ChunkProducts``' backward multiplies by, rebuilt from ``ChunkTables``' small factors:
    conj(E) (H, J, N) and conj(R) (H, J, N) as pairs, and T (H, J, J).

    Keeping E, T and R for backward instead cost their bytes, H J (2N + J) fp32 per layer (42 MiB at d_model 2048,
    J 32, N 64: more than the chunk states); the backward conjugated copies of E and R anyway, and rebuilding
    them conjugated is one product of the factors, as those copies were.
    """
    J = coarse.shape[0] * (fine.shape[0] - 1)
    conj_R, conj_E = _with_conj_E(2 * w * coarse, coarse, fine)
    return conj_E, band.unfold(1, J, 1)[:, 1:].flip(1), conj_R


class ChunkTables(torch.autograd.Function):
    """dtA, w (H, N/2) complex, D (H,) or None, J -> E (H, J, N), T (H, J, J), R (H, J, N) real, zJ (H, N/2) complex,
    and, not differentiable, the factors ``backward_tables`` rebuilds from: coarse (K1, H, N/2), fine (K2 + 1, H,
    N/2) complex and the taps' band (H, 2J) real."""

    @staticmethod
    def forward(ctx, dtA: torch.Tensor, w: torch.Tensor, D: torch.Tensor | None, J: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        H, half = dtA.shape
        N, real = 2 * half, dtA.real.dtype
        K1, K2 = _split(J)
        coarse, fine = _factors_of(dtA, K1, K2, real)  # (K1, H, N/2): z^(k1 K2); (K2 + 1, H, N/2): z^k2
        # R with w folded into the coarse factor, conjugates of the small factors, not of the table; E: P_(J-i) =
        # A_(K1-1-i1) F_(K2-i2) for i = i1 K2 + i2. One product for both.
        R, E = _pairs(torch.stack([(2 * w * coarse).conj_physical(), coarse.flip(0)]),
                      torch.stack([fine[:K2].conj_physical(), fine[1:].flip(0)]))
        # K[l] = sum_n Re R[l, n]: R's pairs times [1, 0, 1, 0, ..], one matrix-vector product over (J H, N)
        even = torch.arange(N, device=R.device).remainder(2).eq(0).to(real)
        taps = torch.mv(R.transpose(0, 1).reshape(J * H, N), even).view(J, H).t()  # (H, J)
        band = torch.zeros(H, 2 * J, dtype=real, device=R.device)
        band[:, J:] = taps
        if D is not None:
            band[:, J] += D
        # windows a = 1 .. J of band are T's rows J - a: T[i, j] = band[J - i + j]
        T = band.unfold(1, J, 1)[:, 1:].flip(1)  # (H, J, J)
        zJ = coarse[-1] * fine[-1]
        ctx.save_for_backward(w, coarse, fine, zJ)
        ctx.has_D = D is not None
        ctx.mark_non_differentiable(coarse, fine, band)
        return E, T, R, zJ, coarse, fine, band

    @staticmethod
    def backward(ctx, dE: torch.Tensor | None, dT: torch.Tensor | None, dR: torch.Tensor | None,
                 dzJ: torch.Tensor | None, *_factors: None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        w, coarse, fine, zJ = ctx.saved_tensors
        K1, H, half = coarse.shape
        K2 = fine.shape[0] - 1
        J, real = K1 * K2, coarse.real.dtype
        j = torch.arange(J, device=w.device, dtype=real)
        weights = torch.stack([torch.ones_like(j), j])  # (2, J): [1, j]
        d_dtA = J * zJ.conj() * dzJ if dzJ is not None else torch.zeros_like(zJ)
        dw = torch.zeros_like(w)
        dK = None
        # P_j and conj(P_(J-i)) (conj(E), from the conjugated factors read backwards), one product
        P, conj_E = _with_conj_E(coarse, coarse, fine)
        if dT is not None or dR is not None:
            sums = torch.zeros(H, 2, half, dtype=w.dtype, device=w.device)  # sum_j P_j g_j, sum_j j P_j g_j
            if dT is not None:
                # dK_l = sum_i dT[i, i + l]: row i read from column i on (a view with row stride J + 1), rows
                # i < J - 1 (whose overhang i + l >= J reads the next row's start, masked) and the last diagonal entry
                dT = dT.contiguous()
                skew = dT.as_strided((H, J - 1, J), (J * J, J + 1, 1), dT.storage_offset())
                valid = (torch.arange(J - 1, device=w.device).unsqueeze(1) + torch.arange(J, device=w.device)) < J
                dK = (skew * valid).sum(1)  # (H, J)
                dK[:, 0] += dT[:, J - 1, J - 1]
                sums += _weighted_sums(weights.unsqueeze(0) * dK.unsqueeze(1), P)
            if dR is not None:
                product = _as_complex(P) * _as_complex(dR)  # (H, J, N/2): P_j dR_j
                sums += _weighted_sums(weights, torch.view_as_real(product).flatten(-2))
            dw = 2 * sums[:, 0].conj()
            d_dtA = d_dtA + (2 * w * sums[:, 1]).conj()
        if dE is not None:
            # sum_i (J - i) conj(P_(J-i)) dE_i
            product = torch.view_as_real(_as_complex(conj_E) * _as_complex(dE)).flatten(-2)  # (H, J, N)
            d_dtA = d_dtA + _weighted_sums((J - j).unsqueeze(0), product)[:, 0]
        dD = dK[:, 0].clone() if ctx.has_D and dK is not None else None
        return d_dtA, dw, dD, None
