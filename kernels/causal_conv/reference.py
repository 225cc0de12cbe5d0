"""The short causal convolution as a sum of shifted copies: the definition ``causal_conv`` is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """y[b, h, t] = sum_{j < W} k[h, j] u[b, h, t - j] + D[h] u[b, h, t] (u = 0 before t = 0).

    u: (B, H, L); k: (H, W); D: (H,) or None -> y: (B, H, L).
    """
    L = u.shape[-1]
    y = u * D.unsqueeze(-1) if D is not None else torch.zeros_like(u)
    for j in range(min(k.shape[-1], L)):
        y = y + k[:, j : j + 1] * F.pad(u, (j, 0))[..., :L]  # u delayed by j steps
    return y
