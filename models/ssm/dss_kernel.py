"""DSS-softmax kernel (Gupta et al. 2022, "Diagonal State Spaces are as Effective as Structured State Spaces").

With diagonal Lambda (N modes, complex), step dt and complex weights W, Proposition 1 gives the kernel

    K = Re( W . Lambda^-1 (exp(Lambda dt) - 1) . row_softmax(P) ),   P[n, k] = Lambda_n k dt,  k < L,

the softmax taken over k for each mode: ``exp(Lambda_n k dt) / sum_{j<L} exp(Lambda_n j dt)``. Normalising
over the length lets Re(Lambda) take either sign; as in the reference code, modes with Re(Lambda) > 0 are
computed from the other end (exponent shifted by (L-1) Lambda dt) so nothing overflows.

Recurrent view: ``K_k = Re(sum_n c_n z_n^k)`` with ``z_n = exp(Lambda_n dt)``, i.e. ``x_k = z x_{k-1} + u_k``,
``y_k = Re(c . x_k)``. The normalisation ties the kernel to one length L: DSS layers here fix L to a
configured ``kernel_len`` and truncate, so forward and step agree for every input length up to it.
"""

from __future__ import annotations

import torch


def _parts(lam: torch.Tensor, dt: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dtlam (H, N), shift (H, N), coefficient c without W (H, N)); all complex."""
    dtlam = dt.unsqueeze(-1) * lam  # (H, N)
    positive = lam.real > 0  # (H, N)
    flip = torch.where(positive, -1.0, 1.0).to(dtlam.real.dtype)
    dtlam_neg = dtlam * flip  # Re < 0 for every mode: both sums below stay bounded
    # sum_{j<L} exp(dtlam j), written for the negative-real exponent; for positive modes the softmax numerator
    # is shifted by exp(-(L-1) dtlam) to match.
    norm = torch.expm1(dtlam_neg) / torch.expm1(dtlam_neg * length)  # (H, N) = 1 / sum_j exp(dtlam_neg j)
    shift = torch.where(positive, -(length - 1) * dtlam, torch.zeros_like(dtlam))  # (H, N)
    coef = torch.expm1(dtlam) / lam * norm  # (H, N)
    return dtlam, shift, coef


def dss_softmax_kernel(
    lam: torch.Tensor, W: torch.Tensor, dt: torch.Tensor, length: int, keep: int | None = None
) -> torch.Tensor:
    """Real kernel (H, keep) normalised over `length` (keep <= length; default all). lam, W: complex (H, N); dt (H,)."""
    dtlam, shift, coef = _parts(lam, dt, length)
    k = torch.arange(length if keep is None else keep, device=lam.device, dtype=dtlam.real.dtype)
    # Row of P, stabilised: a + ib = dtlam k + shift, (H, N, L). Re(w exp(a + ib)) = exp(a) (Re w cos b -
    # Im w sin b) in real arithmetic: torch's complex exp is not vectorised on CPU (as kernels.fftconv.ssm_kernel).
    a = dtlam.real.unsqueeze(-1) * k + shift.real.unsqueeze(-1)
    b = dtlam.imag.unsqueeze(-1) * k + shift.imag.unsqueeze(-1)
    w, mag = W * coef, torch.exp(a)  # (H, N), (H, N, L)
    return (torch.einsum("hn,hnl->hl", w.real, mag * torch.cos(b))
            - torch.einsum("hn,hnl->hl", w.imag, mag * torch.sin(b)))


def dss_recurrence(lam: torch.Tensor, W: torch.Tensor, dt: torch.Tensor, length: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same kernel as a diagonal recurrence: (z, c), complex (H, N), with K_k = Re(sum_n c_n z_n^k)."""
    dtlam, shift, coef = _parts(lam, dt, length)
    return torch.exp(dtlam), W * coef * torch.exp(shift)
