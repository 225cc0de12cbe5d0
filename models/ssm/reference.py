"""Loop-by-loop references for the SSM family: the definitions the FFT/Cauchy paths are tested against.

Nothing here is fast; everything is written the way the papers state it (a dense state matrix, one time
step at a time; a convolution as a double sum) so a test can compare the fused path with the definition.
"""

from __future__ import annotations

import torch


def discretize_bilinear(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bilinear transform: A (H, N, N), B (H, N), dt (H,) -> dA = (I - dt/2 A)^-1 (I + dt/2 A), dB (H, N)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    half = (dt / 2).to(A.dtype).view(-1, 1, 1)
    inv = torch.linalg.inv(eye - half * A)  # (H, N, N)
    return inv @ (eye + half * A), (inv @ (dt.to(A.dtype).view(-1, 1, 1) * B.unsqueeze(-1))).squeeze(-1)


def discretize_zoh_diagonal(lam: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold for a diagonal A = diag(lam) (H, N), B = 1: dA = exp(dt lam), dB = (exp(dt lam) - 1) / lam."""
    dtlam = dt.unsqueeze(-1).to(lam.dtype) * lam
    return torch.diag_embed(torch.exp(dtlam)), (torch.exp(dtlam) - 1) / lam


def recurrence(
    u: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
    scale: float = 2.0,
) -> torch.Tensor:
    """Run ``x_k = dA x_{k-1} + dB u_k, y_k = scale * Re(C x_k) + D u_k`` one step at a time.

    u: (B, H, L) real; dA: (H, N, N) complex dense; dB, C: (H, N) complex; D: (H,) or None. Returns (B, H, L).
    scale 2 reads out a conjugate-pair half state (S4, S4D), 1 a plain complex state (DSS).
    """
    batch, H, L = u.shape
    x = torch.zeros(batch, H, dA.shape[-1], dtype=dA.dtype)
    ys = []
    for k in range(L):
        x = torch.einsum("hmn,bhn->bhm", dA, x) + dB * u[..., k].unsqueeze(-1).to(dA.dtype)
        y = scale * (C * x).sum(-1).real
        ys.append(y if D is None else y + D * u[..., k])
    return torch.stack(ys, dim=-1)


def kernel_by_powers(dA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """K_k = C dA^k dB for k < length by repeated multiplication: complex (H, length)."""
    x, ks = dB, []
    for _ in range(length):
        ks.append((C * x).sum(-1))
        x = torch.einsum("hmn,hn->hm", dA, x)
    return torch.stack(ks, dim=-1)


def convolve(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None, backward: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Direct double sum: ``y_t = sum_{s<=t} k[t-s] u_s (+ sum_{s>t} backward[s-t-1] u_s) + D u_t``.

    u: (B, H, L); k, backward: (H, L); D: (H,) or None. Returns (B, H, L).
    """
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        for s in range(L):
            if s <= t:
                y[..., t] += k[:, t - s] * u[..., s]
            elif backward is not None:
                y[..., t] += backward[:, s - t - 1] * u[..., s]
    return y if D is None else y + D.unsqueeze(-1) * u
