"""Materialised Vandermonde products of a diagonal SSM: the readable definitions ``chunked.py`` is tested against.

They form the full (H, N/2, L) table of powers exp(dtA l), which is what made the SSM kernel the
slowest and hungriest part of H3 (and what autograd kept for backward); use them in tests only.
"""

from __future__ import annotations

import torch


def powers(dtA: torch.Tensor, length: int) -> torch.Tensor:
    """exp(dtA l) for l = 0 .. length-1: dtA (H, N/2) complex -> (H, N/2, length) complex."""
    steps = torch.arange(length, device=dtA.device, dtype=dtA.real.dtype)
    decay = torch.exp(dtA.real.unsqueeze(-1) * steps)  # (H, N/2, L)
    angle = dtA.imag.unsqueeze(-1) * steps  # (H, N/2, L)
    return torch.complex(decay * torch.cos(angle), decay * torch.sin(angle))


def vandermonde_ref(w: torch.Tensor, dtA: torch.Tensor, length: int) -> torch.Tensor:
    """K[..., h, l] = 2 Re(sum_n w[..., h, n] exp(dtA[h, n] l)).

    w (..., H, N/2), dtA (H, N/2) complex -> K (..., H, L) real.
    """
    return 2 * torch.einsum("...hn,hnl->...hl", w, powers(dtA, length)).real


def vandermonde_transpose_ref(g: torch.Tensor, dtA: torch.Tensor) -> torch.Tensor:
    """S[..., h, n] = sum_l g[..., h, l] exp(dtA[h, n] l): g (..., H, L) real, dtA (H, N/2) -> (..., H, N/2) complex."""
    return torch.einsum("...hl,hnl->...hn", g.to(dtA.dtype), powers(dtA, g.shape[-1]))
