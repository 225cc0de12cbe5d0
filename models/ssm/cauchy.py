"""S4's kernel for a diagonal-plus-low-rank state matrix, through the generating function (Gu et al. 2022, Alg. 1).

State matrix ``A = diag(Lambda) - P P^*`` (per channel, N/2 complex modes), bilinear discretisation with step dt:
``dA = (I - dt/2 A)^-1 (I + dt/2 A)``, ``dB = (I - dt/2 A)^-1 dt B``, kernel ``K_k = C dA^k dB``.

Instead of powering dA, evaluate the kernel's length-L generating function at the L roots of unity
``w_j = exp(-2 pi i j / L)``, where it collapses to a resolvent:

    sum_{k<L} K_k w^k = Ct (I - dA w)^-1 dB = 2 Ct M(w)^-1 B,     Ct = C (I - dA^L),
    M(w) = (2/dt)(1 - w) I - (1 + w) A = R(w) + (1 + w) P P^*,   R(w) = diag((2/dt)(1 - w) - (1 + w) Lambda).

Woodbury turns M^-1 into four Cauchy sums ``k(a, b) = sum_n a_n b_n / R_n(w)``:

    Ct M^-1 B = k(Ct, B) - (1 + w) k(Ct, P) k(P*, B) / (1 + (1 + w) k(P*, P)),

and an inverse FFT of the L values gives K. Multiplying S4's ``2/(1+w)`` into M keeps w = -1 finite.
"""

from __future__ import annotations

import math

import torch


def dplr_dense(lam: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The state matrix ``diag(lam) - P P^*`` as a dense complex (H, N/2, N/2), from lam and P complex (H, N/2)."""
    return torch.diag_embed(lam) - P.unsqueeze(-1) * P.conj().unsqueeze(-2)


def bilinear(
    lam: torch.Tensor, P: torch.Tensor, B: torch.Tensor, dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin) discretisation of the DPLR system, materialised: (dA (H, N/2, N/2), dB (H, N/2)).

    lam, P, B: complex (H, N/2); dt: real (H,). N/2 is small (tens), so one batched solve is cheaper and
    simpler here than S4's Woodbury form of the backward-Euler half.
    """
    A = dplr_dense(lam, P)  # (H, N, N) with N = N/2 modes
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    half = (dt / 2).to(A.dtype).view(-1, 1, 1)  # (H, 1, 1)
    back = eye - half * A  # (H, N, N)
    dA = torch.linalg.solve(back, eye + half * A)
    dB = torch.linalg.solve(back, (dt.to(A.dtype).unsqueeze(-1) * B).unsqueeze(-1)).squeeze(-1)  # (H, N)
    return dA, dB


def dplr_kernel(
    lam: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, length: int
) -> torch.Tensor:
    """Complex half-kernel ``K_k = C dA^k dB``, k < length, via the generating function: complex (H, length).

    lam, P, B, C: complex (H, N/2); dt: real (H,). The real SSM kernel is ``2 Re(K)`` (conjugate pairs).
    """
    dA, _ = bilinear(lam, P, B, dt)
    # Ct = C (I - dA^L): S4 learns Ct directly for one fixed L; computing it from C for the length at hand
    # (log2 L squarings of an N/2 x N/2 matrix) keeps one parameterisation valid for every length and for step().
    Ct = C - torch.einsum("hm,hmn->hn", C, torch.linalg.matrix_power(dA, length))  # (H, N/2)
    j = torch.arange(length, device=lam.device, dtype=lam.real.dtype)
    w = torch.polar(torch.ones_like(j), -2 * math.pi * j / length)  # (L,) roots of unity
    R = (2 / dt).to(lam.dtype).view(-1, 1, 1) * (1 - w) - (1 + w) * lam.unsqueeze(-1)  # (H, N/2, L)
    Pc = P.conj()
    # The four Cauchy sums in one contraction, so the (H, N/2, L) resolvent is read once.
    num = torch.stack([Ct * B, Ct * P, Pc * B, Pc * P], dim=1)  # (H, 4, N/2)
    k00, k01, k10, k11 = torch.einsum("hkn,hnl->khl", num, 1 / R)  # each (H, L)
    gen = 2 * (k00 - (1 + w) * k01 * k10 / (1 + (1 + w) * k11))  # (H, L) generating function at w_j
    return torch.fft.ifft(gen, n=length)  # (H, L)
