"""Pure-PyTorch FFT convolution: the readable definition every faster backend is tested against."""

from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 at least (half-precision FFTs lose too much), fp64 when any input is fp64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fftconv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Causal long convolution ``y[..., t] = sum_{s<=t} k[..., t-s] u[..., s] + D * u[..., t]``.

    u: (B, H, L) input; k: (H, L) causal kernel; D: (H,) skip weight or None.
    Returns y: (B, H, L) in u's dtype. Zero-padding both signals to 2L turns the FFT's circular
    convolution into a linear one, of which the first L outputs are the causal part.
    """
    L = u.shape[-1]
    dtype = _compute_dtype(u, k) if D is None else _compute_dtype(u, k, D)
    n = 2 * L
    u_f = torch.fft.rfft(u.to(dtype), n=n)  # (B, H, L + 1)
    k_f = torch.fft.rfft(k.to(dtype), n=n)  # (H, L + 1)
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :L]  # (B, H, L)
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype).unsqueeze(-1)
    return y.to(u.dtype)
