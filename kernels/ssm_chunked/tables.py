"""The chunked SSM's (H, J, .) tables from dtA, w = C dB and D, as one autograd Function with its own backward.

With z = exp(dtA) per mode and P_k = z^k:

    W[:, i]  = [P_(J-i) as (re, im) pairs | T[i, :]],   T[i, j] = K[j - i] for j >= i, else 0 (+ D at j = i)
    R[:, j]  = conj(2 w P_j) as pairs,                  K[l] = 2 Re sum_n w P_l = sum_n Re R[l, n]
    zJ       = P_J

W multiplies a chunk's J inputs into [its own contribution to the state at its end | its within-chunk
output], R reads a chunk's entering state out at each of its steps. Every table of J rows is written once,
straight into its buffer: P_k = A_(k1) F_(k2) for k = k1 K2 + k2 with coarse A_(k1) = z^(k1 K2) and fine
F_(k2) = z^(k2) (exp, cos and sin on K1 + K2 ~ 2 sqrt(J) numbers per mode, ``vandermonde.chunked._powers``),
so each complex table is one outer product of two small ones, the P_(J-i) of W from the same factors read
backwards; T is one broadcast copy into a skewed (stride + 1) view of W's buffer. Autograd through
``torch.exp``, flips, a cat and an index_select had cost 3-9x the forward's time in backward on the 2-core VM.

Backward, in PyTorch's convention for complex gradients (dL/dRe + i dL/dIm), with g_j the gradient of R's
row j as complex numbers plus dK_j on the real parts (the taps read R's real parts), dI_i that of W's pairs:

    dK_l   = sum_i dT[i, i + l]  (diagonal sums)            dD = dK_0
    dw     = 2 conj(sum_j P_j g_j)
    d dtA  = sum_i (J - i) conj(P_(J-i)) dI_i + conj(2 w sum_j j P_j g_j) + J conj(zJ) dzJ

(the tables are holomorphic in dtA, d P_k / d dtA = k P_k). The sums over j = j1 K2 + j2 run over the
factors: sum_j P_j g_j = sum_j1 A_j1 sum_j2 F_j2 g_j, so no table is rebuilt or flipped.
"""

from __future__ import annotations

import torch

from hybrid_pretrain.kernels.vandermonde.chunked import _factors, _powers


def _split(J: int) -> tuple[int, int]:
    """(K1, K2) with K1 K2 = J exactly and K2 ~ sqrt(J) where a divisor is near; else (J, 1)."""
    K1, K2 = _factors(J)
    return (K1, K2) if K1 * K2 == J else (J, 1)


def _complex(pairs: torch.Tensor) -> torch.Tensor:
    """(..., N) real (re, im) pairs -> (..., N/2) complex view (a copy if its strides are odd)."""
    pairs = pairs.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(s % 2 for s in pairs.stride()[:-1]) or pairs.storage_offset() % 2:
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def _moments(G: torch.Tensor, fine: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G (H, K1, K2, N/2), fine (H, K2, N/2), weights (K2,) -> sum_k2 f G and sum_k2 weight f G, (H, K1, N/2)."""
    both = torch.stack([fine, fine * weights.unsqueeze(-1)], dim=1)  # (H, 2, K2, N/2)
    sums = (G.unsqueeze(2) * both.unsqueeze(1)).sum(3)  # (H, K1, 2, N/2)
    return sums[:, :, 0], sums[:, :, 1]


class ChunkTables(torch.autograd.Function):
    """dtA, w (H, N/2) complex, D (H,) or None, J -> W (H, J, N + J), R (H, J, N) real, zJ (H, N/2) complex.

    W is a view with row stride N + 2J of a padded buffer (bmm reads it as it is): the padding takes the
    skewed view's overhang, so the Toeplitz block needs no masking on the way in.
    """

    @staticmethod
    def forward(ctx, dtA: torch.Tensor, w: torch.Tensor, D: torch.Tensor | None, J: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, half = dtA.shape
        N, real = 2 * half, dtA.real.dtype
        K1, K2 = _split(J)
        coarse = _powers(dtA, K1, K2, real)  # (H, K1, N/2): z^(k1 K2)
        fine = _powers(dtA, K2 + 1, 1, real)  # (H, K2 + 1, N/2): z^k2 for k2 <= K2
        # R: conj(2 w P_j) = conj(2 w A_j1) conj(F_j2), w folded into the coarse factor
        R = dtA.new_empty((H, J, N), dtype=real)
        torch.mul((2 * w.unsqueeze(1) * coarse).conj().unsqueeze(2), fine[:, :K2].conj().unsqueeze(1),
                  out=torch.view_as_complex(R.view(H, K1, K2, half, 2)))
        taps = R.view(H, J, half, 2)[..., 0].sum(-1)  # (H, J): K
        # W's buffer: rows of S = N + 2J, after `front` numbers that take the first row's skewed overhang
        S, front = N + 2 * J, J + J % 2
        buf = dtA.new_empty(front + H * J * S, dtype=real)
        W = buf.as_strided((H, J, N + J), (J * S, S, 1), front)
        # T: row i of the view starting J columns left of the diagonal holds [0] * J + K (K_0 + D first)
        band = torch.zeros(H, 2 * J, dtype=real, device=dtA.device)
        band[:, J:] = taps
        if D is not None:
            band[:, J] += D.to(real)
        buf.as_strided((H, J, 2 * J), (J * S, S + 1, 1), front + N - J).copy_(band.unsqueeze(1))
        # W's pairs last (the band's zeros overlap them): P_(J-i) = A_(K1-1-i1) F_(K2-i2) for i = i1 K2 + i2
        torch.mul(coarse.flip(1).unsqueeze(2), fine[:, 1:].flip(1).unsqueeze(1),
                  out=torch.view_as_complex(W[..., :N].unflatten(-1, (half, 2))).unflatten(1, (K1, K2)))
        zJ = coarse[:, -1] * fine[:, -1]
        ctx.save_for_backward(w, coarse, fine, zJ)
        ctx.has_D = D is not None
        return W, R, zJ

    @staticmethod
    def backward(ctx, dW: torch.Tensor | None, dR: torch.Tensor | None, dzJ: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        w, coarse, fine, zJ = ctx.saved_tensors
        H, K1, half = coarse.shape
        K2 = fine.shape[1] - 1
        J, N = K1 * K2, 2 * half
        real = coarse.real.dtype
        dW = torch.zeros(H, J, N + J, dtype=real, device=w.device) if dW is None else dW.contiguous()
        # dK_l = sum_i dT[i, i + l]: a skewed view of rows i < J - 1 (in bounds; i + l >= J reads the next row,
        # masked), and row J - 1's one entry on the diagonal
        skew = dW.as_strided((H, J - 1, J), (J * (N + J), N + J + 1, 1), dW.storage_offset() + N)
        i = torch.arange(J - 1, device=w.device)
        valid = (i.unsqueeze(1) + torch.arange(J, device=w.device)) < J  # (J - 1, J)
        dK = (skew * valid).sum(1)  # (H, J)
        dK[:, 0] += dW[:, J - 1, N + J - 1]
        # g: R's gradient as complex numbers, the taps' dK added to the real parts
        taps_grad = torch.stack([dK, torch.zeros_like(dK)], dim=-1).unsqueeze(2)  # (H, J, 1, 2)
        g = torch.empty(H, J, half, 2, dtype=real, device=w.device)
        if dR is None:
            g.copy_(taps_grad)
        else:
            torch.add(dR.unflatten(-1, (half, 2)), taps_grad, out=g)
        g = torch.view_as_complex(g).view(H, K1, K2, half)
        steps = torch.arange(K2, device=w.device, dtype=real)
        M0, M1 = _moments(g, fine[:, :K2], steps)  # sum_j2 F g, sum_j2 j2 F g
        sum_Pg = (coarse * M0).sum(1)  # (H, N/2): sum_j P_j g_j
        sum_jPg = (coarse * (M0 * (K2 * torch.arange(K1, device=w.device, dtype=real)).unsqueeze(-1) + M1)).sum(1)
        dw = 2 * sum_Pg.conj()
        d_dtA = (2 * w * sum_jPg).conj()
        # W's pairs: sum_i (J - i) conj(P_(J-i)) dI_i with J - i = (K1 - 1 - i1) K2 + (K2 - i2)
        dI = _complex(dW[..., :N]).unflatten(1, (K1, K2))  # (H, K1, K2, N/2)
        N0, N1 = _moments(dI, fine[:, 1:].flip(1).conj(), K2 - steps)
        lead = (K2 * torch.arange(K1 - 1, -1, -1, device=w.device, dtype=real)).unsqueeze(-1)  # (K1, 1)
        d_dtA = d_dtA + (coarse.flip(1).conj() * (N0 * lead + N1)).sum(1)
        if dzJ is not None:
            d_dtA = d_dtA + J * zJ.conj() * dzJ
        return d_dtA, dw, dK[:, 0].clone() if ctx.has_D else None, None
