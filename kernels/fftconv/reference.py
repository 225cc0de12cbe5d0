"""Pure-PyTorch FFT convolution: the readable definition every faster backend is tested against."""

from __future__ import annotations

import torch

from hybrid_pretrain.kernels.vandermonde.reference import vandermonde_ref


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


def ssm_kernel_ref(dtA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """Convolution kernel of a diagonal SSM with conjugate-pair modes: K[l] = 2 Re(sum_n C_n dB_n exp(dtA_n l)).

    dtA, dB, C: complex (H, N/2) (dtA = dt * A, the log of the discrete dA). Returns K: (H, length), real.
    Materialises the (H, N/2, L) powers (``kernels.vandermonde.vandermonde_ref``); ``ssm_kernel`` does not.
    """
    return vandermonde_ref(C * dB, dtA, length)


def ssm_conv_ref(
    u: torch.Tensor, dtA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None
) -> torch.Tensor:
    """The diagonal SSM ``x_t = exp(dtA) x_{t-1} + dB u_t, y_t = 2 Re(C x_t) + D u_t`` over all of u, as one FFT
    convolution with its full-length kernel. u: (B, H, L); dtA, dB, C: complex (H, N/2); D: (H,) -> y (B, H, L).
    """
    return fftconv_ref(u, ssm_kernel_ref(dtA, dB, C, u.shape[-1]), D)
