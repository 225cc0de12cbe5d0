"""The FFT convolution with torch.fft (pocketfft on CPU, cuFFT on GPU), lean in time and memory.

Compared with autograd through ``fftconv_ref``: the FFT length is the smallest 2^a 3^b 5^c >= 2L - 1
instead of 2L (every wrapped term still multiplies a zero); the kernel's spectrum is computed once
per call and broadcast over the batch; the pointwise product runs in place; and backward keeps only
the real input u and kernel k, recomputing their spectra, where autograd would keep the complex
spectrum of u (twice u's bytes at fp32) and the kernel's alive from forward to backward.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from hybrid_pretrain.kernels.fftconv.reference import _compute_dtype


@lru_cache(maxsize=256)
def fft_length(length: int) -> int:
    """The smallest even 2^a 3^b 5^c >= 2 length - 1: long enough that the circular convolution is linear
    on the first `length` outputs, and a size pocketfft and cuFFT both transform fast."""
    target = max(2, 2 * length - 1)
    best = 1 << (target - 1).bit_length()  # a power of two always qualifies
    p3 = 1
    while p3 < best:
        p35 = p3
        while p35 < best:
            n = p35 * 2  # even: the real FFT halves cleanly
            while n < target:
                n *= 2
            best = min(best, n)
            p35 *= 5
        p3 *= 3
    return best


class FFTConv(torch.autograd.Function):
    """y = irfft(rfft(u) rfft(k))[:L] + D u, saving u, k and D only; shapes as ``fftconv_torch``."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
        L = u.shape[-1]
        n = fft_length(L)
        dtype = _compute_dtype(u, k) if D is None else _compute_dtype(u, k, D)
        spectrum = torch.fft.rfft(u.to(dtype), n=n)  # (B, H, n/2 + 1)
        spectrum.mul_(torch.fft.rfft(k.to(dtype), n=n))  # kernel spectrum (H, n/2 + 1), shared by the batch
        y = torch.fft.irfft(spectrum, n=n)[..., :L]  # (B, H, L), a view of (B, H, n)
        del spectrum
        y = y.contiguous() if D is None else torch.addcmul(y, u.to(dtype), D.to(dtype).unsqueeze(-1))
        ctx.save_for_backward(u, k, D)
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        u, k, D = ctx.saved_tensors
        L = u.shape[-1]
        n = fft_length(L)
        dtype = _compute_dtype(u, k) if D is None else _compute_dtype(u, k, D)
        dy = dy.to(dtype)
        du = dk = dD = None
        grad_spectrum = torch.fft.rfft(dy, n=n)  # (B, H, n/2 + 1)
        if ctx.needs_input_grad[1]:  # dk[j] = sum_b sum_t u[t - j] dy[t]: a correlation, summed over the batch
            u_spectrum = torch.fft.rfft(u.to(dtype), n=n).conj_physical_()
            dk = torch.fft.irfft(u_spectrum.mul_(grad_spectrum).sum(0), n=n)[..., :L].to(k.dtype)  # (H, L)
            del u_spectrum
        if ctx.needs_input_grad[0]:  # du[s] = sum_t k[t - s] dy[t] + D dy[s]
            k_spectrum = torch.fft.rfft(k.to(dtype), n=n).conj_physical_()
            du = torch.fft.irfft(grad_spectrum.mul_(k_spectrum), n=n)[..., :L]
            du = du.contiguous() if D is None else torch.addcmul(du, dy, D.to(dtype).unsqueeze(-1))
            du = du.to(u.dtype)
        if D is not None and ctx.needs_input_grad[2]:
            dD = torch.einsum("bhl,bhl->h", u.to(dtype), dy).to(D.dtype)
        return du, dk, dD


def fftconv_torch(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Causal convolution by torch.fft. u: (B, H, L); k: (H, L); D: (H,) or None -> y: (B, H, L) in u's dtype,
    computed in fp32 (fp64 when an input is fp64). Differentiable in u, k and D."""
    return FFTConv.apply(u, k, D)
