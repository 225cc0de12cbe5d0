"""FlashConv in Triton: the FFT convolution with every DFT written as dense block matmuls (``tl.dot``).

A length-N DFT with N = N1 * N2 factors (Cooley-Tukey, the Monarch decomposition of FlashConv) into
an N1-point DFT over the rows of the signal viewed as an (N1, N2) matrix, a pointwise twiddle, and an
N2-point DFT over its columns; both small DFTs are matmuls with (N1 x N1) and (N2 x N2) DFT
matrices, which run on tensor cores instead of the memory-bound butterflies of cuFFT. One program
holds a whole sequence: FFT(u), multiply by the kernel's spectrum, inverse FFT and the skip term are
fused, so u is read once and y written once. The math, with the index maps, is in README.md.

Limits: L <= MAX_LEN (8K, N = 2L <= 16K = 128 x 128); longer sequences go through state passing.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton.language as tl

from hybrid_pretrain.kernels._triton import jit

MAX_LEN = 8192
MIN_FFT = 512  # tl.dot needs every matrix dimension >= 16, so N1/2 >= 16 and N2 >= 16


def fft_shape(L: int) -> tuple[int, int]:
    """(N1, N2) with N1 * N2 = N >= 2L a power of two (zero padding makes the convolution linear)."""
    N = max(MIN_FFT, 1 << (2 * L - 1).bit_length())
    N2 = 1 << (N.bit_length() - 1) // 2
    return N // N2, N2


@lru_cache(maxsize=32)
def _dft_factors(N1: int, N2: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """fp32 (re, im) of F1[:, :N1/2], the twiddles T[k1, n2] = w_N^(k1 n2) and F2, with w_m = exp(-2 pi i / m).

    Built in fp64 so that the only rounding is the final cast.
    """
    N = N1 * N2

    def expi(num: torch.Tensor, den: int) -> tuple[torch.Tensor, torch.Tensor]:
        angle = -2 * math.pi * torch.remainder(num, den).double() / den  # remainder keeps angles small
        return angle.cos().float().to(device).contiguous(), angle.sin().float().to(device).contiguous()

    k1 = torch.arange(N1).unsqueeze(1)
    f1 = expi(k1 * torch.arange(N1 // 2).unsqueeze(0), N1)  # (N1, N1/2): input rows n1 >= N1/2 are padding
    tw = expi(k1 * torch.arange(N2).unsqueeze(0), N)  # (N1, N2)
    n2 = torch.arange(N2)
    f2 = expi(n2.unsqueeze(1) * n2.unsqueeze(0), N2)  # (N2, N2), symmetric
    return (*f1, *tw, *f2)


def kernel_spectrum(k: torch.Tensor, N1: int, N2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k: (H, L) -> its length-N DFT in the kernel's (k1, k2) layout, re and im each (H, N1, N2) fp32.

    The kernel's output frequency k1 + N1 k2 lands at [k1, k2]; computed once per call with torch.fft
    because it is shared by the whole batch (as FlashConv does).
    """
    kf = torch.fft.fft(k.float(), n=N1 * N2).view(k.shape[0], N2, N1).transpose(1, 2)  # (H, N1, N2)
    return kf.real.contiguous(), kf.imag.contiguous()


@jit
def _load_row(ptr, L, N1H: tl.constexpr, N2: tl.constexpr):
    """A length-L row as the (N1/2, N2) matrix x[n1, n2] = row[n1 * N2 + n2], zero beyond L, in fp32."""
    idx = tl.arange(0, N1H)[:, None] * N2 + tl.arange(0, N2)[None, :]
    return tl.load(ptr + idx, mask=idx < L, other=0.0).to(tl.float32)


@jit
def _store_row(ptr, x, L, N1H: tl.constexpr, N2: tl.constexpr):
    idx = tl.arange(0, N1H)[:, None] * N2 + tl.arange(0, N2)[None, :]
    tl.store(ptr + idx, x.to(ptr.dtype.element_ty), mask=idx < L)


@jit
def _load_mat(ptr, R: tl.constexpr, C: tl.constexpr):
    return tl.load(ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])


@jit
def _load_mat_t(ptr, R: tl.constexpr, C: tl.constexpr):
    """The transpose of the row-major (C, R) matrix at ptr, as an (R, C) block."""
    return tl.load(ptr + tl.arange(0, R)[:, None] + tl.arange(0, C)[None, :] * R)


@jit
def _fft(x, f1r, f1i, twr, twi, f2r, f2i, PREC: tl.constexpr):
    """Real x (N1/2, N2) zero-padded to N -> its DFT (re, im), each (N1, N2), frequency k1 + N1 k2 at [k1, k2]."""
    ar = tl.dot(f1r, x, input_precision=PREC)  # (N1, N2): N1-point DFTs down the columns
    ai = tl.dot(f1i, x, input_precision=PREC)
    ar, ai = ar * twr - ai * twi, ar * twi + ai * twr  # twiddle w_N^(k1 n2)
    br = tl.dot(ar, f2r, input_precision=PREC) - tl.dot(ai, f2i, input_precision=PREC)  # N2-point DFTs along rows
    bi = tl.dot(ar, f2i, input_precision=PREC) + tl.dot(ai, f2r, input_precision=PREC)
    return br, bi


@jit
def _ifft_real(br, bi, g1r, g1i, twr, twi, f2r, f2i, N: tl.constexpr, PREC: tl.constexpr):
    """Spectrum (re, im) in the (k1, k2) layout -> the first N/2 outputs of its real inverse DFT, as (N1/2, N2).

    The forward steps conjugated and reversed; g1 = F1[:, :N1/2]^T, so only the rows that hold y[:L] are made.
    """
    cr = tl.dot(br, f2r, input_precision=PREC) + tl.dot(bi, f2i, input_precision=PREC)  # B @ conj(F2)
    ci = tl.dot(bi, f2r, input_precision=PREC) - tl.dot(br, f2i, input_precision=PREC)
    cr, ci = cr * twr + ci * twi, ci * twr - cr * twi  # conj twiddle
    y = tl.dot(g1r, cr, input_precision=PREC) + tl.dot(g1i, ci, input_precision=PREC)  # Re(conj(F1) @ C)
    return y / N


@jit
def _fftconv_fwd_kernel(
    u_ptr, kr_ptr, ki_ptr, d_ptr, y_ptr, f1r_ptr, f1i_ptr, twr_ptr, twi_ptr, f2r_ptr, f2i_ptr, H, L,
    HAS_D: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (b, h) row: y = iFFT(FFT(u) * FFT(k))[:L] + D u."""
    row = tl.program_id(0)
    h = row % H
    N1H: tl.constexpr = N1 // 2
    f1r, f1i = _load_mat(f1r_ptr, N1, N1H), _load_mat(f1i_ptr, N1, N1H)
    twr, twi = _load_mat(twr_ptr, N1, N2), _load_mat(twi_ptr, N1, N2)
    f2r, f2i = _load_mat(f2r_ptr, N2, N2), _load_mat(f2i_ptr, N2, N2)
    g1r, g1i = _load_mat_t(f1r_ptr, N1H, N1), _load_mat_t(f1i_ptr, N1H, N1)
    kr = _load_mat(kr_ptr + h * N1 * N2, N1, N2)
    ki = _load_mat(ki_ptr + h * N1 * N2, N1, N2)

    u = _load_row(u_ptr + row * L, L, N1H, N2)
    ur, ui = _fft(u, f1r, f1i, twr, twi, f2r, f2i, PREC)
    y = _ifft_real(ur * kr - ui * ki, ur * ki + ui * kr, g1r, g1i, twr, twi, f2r, f2i, N1 * N2, PREC)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * u
    _store_row(y_ptr + row * L, y, L, N1H, N2)


@jit
def _fftconv_bwd_kernel(
    u_ptr, dy_ptr, kr_ptr, ki_ptr, d_ptr, du_ptr, dk_ptr, dd_ptr,
    f1r_ptr, f1i_ptr, twr_ptr, twi_ptr, f2r_ptr, f2i_ptr, B, H, L,
    HAS_D: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr,
):
    """One program per channel h, looping over the batch (dk and dD sum over it).

    du = iFFT(conj(K) DY)[:L] + D dy (a correlation); dk = iFFT(sum_b conj(U_b) DY_b)[:L]; dD = sum u dy.
    """
    h = tl.program_id(0)
    N1H: tl.constexpr = N1 // 2
    f1r, f1i = _load_mat(f1r_ptr, N1, N1H), _load_mat(f1i_ptr, N1, N1H)
    twr, twi = _load_mat(twr_ptr, N1, N2), _load_mat(twi_ptr, N1, N2)
    f2r, f2i = _load_mat(f2r_ptr, N2, N2), _load_mat(f2i_ptr, N2, N2)
    g1r, g1i = _load_mat_t(f1r_ptr, N1H, N1), _load_mat_t(f1i_ptr, N1H, N1)
    kr = _load_mat(kr_ptr + h * N1 * N2, N1, N2)
    ki = _load_mat(ki_ptr + h * N1 * N2, N1, N2)
    d = tl.load(d_ptr + h).to(tl.float32) if HAS_D else 0.0

    acc_r = tl.zeros((N1, N2), dtype=tl.float32)
    acc_i = tl.zeros((N1, N2), dtype=tl.float32)
    dd = tl.zeros((N1H, N2), dtype=tl.float32)
    for b in range(B):
        row = b * H + h
        u = _load_row(u_ptr + row * L, L, N1H, N2)
        dy = _load_row(dy_ptr + row * L, L, N1H, N2)
        ur, ui = _fft(u, f1r, f1i, twr, twi, f2r, f2i, PREC)
        gr, gi = _fft(dy, f1r, f1i, twr, twi, f2r, f2i, PREC)
        du = _ifft_real(kr * gr + ki * gi, kr * gi - ki * gr, g1r, g1i, twr, twi, f2r, f2i, N1 * N2, PREC)
        _store_row(du_ptr + row * L, du + d * dy, L, N1H, N2)
        acc_r += ur * gr + ui * gi  # conj(U) DY
        acc_i += ur * gi - ui * gr
        dd += u * dy
    dk = _ifft_real(acc_r, acc_i, g1r, g1i, twr, twi, f2r, f2i, N1 * N2, PREC)
    _store_row(dk_ptr + h * L, dk, L, N1H, N2)
    if HAS_D:
        tl.store(dd_ptr + h, tl.sum(tl.sum(dd, axis=1), axis=0))


def _precision(device: torch.device) -> str:
    """fp32 products everywhere: TF32 (10-bit mantissa) loses ~3 digits over a long convolution."""
    return "ieee"


class FFTConvTriton(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; shapes as ``fftconv_triton``."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
        B, H, L = u.shape
        N1, N2 = fft_shape(L)
        u = u.contiguous()
        factors = _dft_factors(N1, N2, u.device)
        kr, ki = kernel_spectrum(k, N1, N2)
        y = torch.empty_like(u)
        d = D.contiguous() if D is not None else u  # unused pointer when HAS_D is false
        _fftconv_fwd_kernel[(B * H,)](
            u, kr, ki, d, y, *factors, H, L, HAS_D=D is not None, N1=N1, N2=N2, PREC=_precision(u.device)
        )
        ctx.save_for_backward(u, kr, ki, D)
        ctx.k_dtype = k.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        u, kr, ki, D = ctx.saved_tensors
        B, H, L = u.shape
        N1, N2 = kr.shape[1:]
        dy = dy.contiguous()
        du = torch.empty_like(u)
        dk = torch.empty(H, L, device=u.device, dtype=torch.float32)
        dd = torch.empty(H, device=u.device, dtype=torch.float32)
        _fftconv_bwd_kernel[(H,)](
            u, dy, kr, ki, D if D is not None else u, du, dk, dd, *_dft_factors(N1, N2, u.device), B, H, L,
            HAS_D=D is not None, N1=N1, N2=N2, PREC=_precision(u.device),
        )
        return du, dk.to(ctx.k_dtype), None if D is None else dd.to(D.dtype)


def fftconv_triton(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Fused FFT convolution. u: (B, H, L) with L <= 8192; k: (H, L); D: (H,) or None -> y: (B, H, L) in u's dtype.

    Runs compiled on CUDA tensors and under Triton's interpreter on CPU tensors (slow: for tests).
    """
    if u.shape[-1] > MAX_LEN:
        raise ValueError(f"fftconv_triton handles L <= {MAX_LEN}, got L = {u.shape[-1]}; use state passing")
    return FFTConvTriton.apply(u, k, D)
