"""FFT long convolution, the workhorse of SSM mixers (H3's shift and diagonal SSMs).

The public entry is the functional op ``fftconv``; the math is in this folder's README.md.
"""

from __future__ import annotations

import torch

from kernels.fftconv.reference import fftconv_ref

__all__ = ["fftconv", "fftconv_ref"]


def fftconv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Causal convolution of each channel of ``u`` with its kernel, plus a skip term.

    Args:
        u: (B, H, L) input sequences, any float dtype.
        k: (H, L) causal convolution kernel, one per channel (k[:, 0] weights the current step).
        D: (H,) per-channel skip weight, or None for no skip.

    Returns:
        y: (B, H, L) in u's dtype, ``y[b, h, t] = sum_{s<=t} k[h, t-s] u[b, h, s] + D[h] u[b, h, t]``,
        computed in fp32 (fp64 for fp64 inputs). Differentiable in u, k and D.
    """
    if u.dim() != 3 or k.dim() != 2 or k.shape != (u.shape[1], u.shape[2]):
        raise ValueError(f"fftconv expects u (B, H, L) and k (H, L), got u {tuple(u.shape)} and k {tuple(k.shape)}")
    if D is not None and D.shape != (u.shape[1],):
        raise ValueError(f"fftconv expects D of shape ({u.shape[1]},), got {tuple(D.shape)}")
    # Single path for now: torch.fft runs on every device and autograd differentiates it; a fused
    # Triton kernel for GPU will be dispatched here once it exists.
    return fftconv_ref(u, k, D)
