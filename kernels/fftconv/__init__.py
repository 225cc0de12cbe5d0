"""FFT long convolution, the workhorse of SSM mixers (H3's shift and diagonal SSMs).

Public ops: ``fftconv`` (a causal convolution with a given kernel) and ``ssm_conv`` (a diagonal SSM
given by its discretised parameters, which is what lets sequences beyond one fused kernel be cut
into chunks with the SSM state passed between them). The math is in this folder's README.md.
Every backend computes in fp32 (fp64 for fp64 inputs) whatever u's dtype and returns u's dtype: the
fp32 island of a bf16 model (kernels/README.md, "Precision under bf16").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_pretrain.kernels.causal_conv.dense import causal_conv_dense, dense_pays
from hybrid_pretrain.kernels.fftconv.reference import fftconv_ref, ssm_conv_ref, ssm_kernel_ref
from hybrid_pretrain.kernels.fftconv.state_passing import ssm_conv_state_passing
from hybrid_pretrain.kernels.fftconv.torch_fft import fft_length, fftconv_torch
from hybrid_pretrain.kernels.fftconv.triton_fftconv import MAX_LEN as TRITON_MAX_LEN
from hybrid_pretrain.kernels.fftconv.triton_fftconv import fftconv_triton
from hybrid_pretrain.kernels.ssm_chunked import ssm_conv_chunked
from hybrid_pretrain.kernels.vandermonde import vandermonde

__all__ = [
    "fftconv", "fftconv_path", "fftconv_ref", "fftconv_torch", "fftconv_triton", "fft_length", "ssm_conv",
    "ssm_conv_path", "ssm_conv_ref", "ssm_conv_state_passing", "ssm_kernel", "ssm_kernel_ref", "TRITON_MAX_LEN",
    "CPU_STATE_PASSING_FROM", "CPU_CHUNKED_FROM",
]


def fftconv_path(u: torch.Tensor) -> str:
    """Which backend ``fftconv`` uses for u: "triton", "dense" (a direct (L, L) matmul) or "torch" (torch.fft)."""
    # CUDA, L <= 8K: the fused kernel reads u once and writes y once; cuFFT's three passes and the
    # complex intermediates in HBM are what it saves. Beyond 8K one program no longer holds a sequence.
    # CPU: torch.fft (pocketfft), except many short sequences (``dense_pays``: H3's synthetic tasks, L = 40),
    # where per-row transform overheads dominate; Triton would run interpreted without a GPU.
    if u.is_cuda and u.shape[-1] <= TRITON_MAX_LEN and u.dtype != torch.float64:
        return "triton"
    return "dense" if not u.is_cuda and dense_pays(u) else "torch"


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
    path = fftconv_path(u)
    if path == "triton":
        return fftconv_triton(u, k, D)
    if path == "dense":
        return causal_conv_dense(u, k, D)
    if D is not None:  # D u is the convolution's tap 0: folded into k, it costs no pass over u either way
        k = k.to(torch.promote_types(k.dtype, D.dtype))
        k = torch.cat([k[:, :1] + D.to(k.dtype).unsqueeze(-1), k[:, 1:]], dim=-1)
    return fftconv_torch(u, k)


CPU_STATE_PASSING_FROM = 16384
CPU_CHUNKED_FROM = 1024


def ssm_conv_path(u: torch.Tensor) -> str:
    """Which algorithm ``ssm_conv`` uses for u: "fftconv" (one convolution), "chunked" or "state_passing"."""
    # CUDA beyond 8K: chunks of 8K through the fused kernel plus an (N/2)-vector carried per chunk,
    # instead of a full-length cuFFT. CPU from 1K under autograd (training): matmuls within chunks of 32-64 and a
    # scan of states between them (``kernels.ssm_chunked``): 0.83-0.85x / 0.62-0.65x / 0.63x the time of building
    # the kernel and convolving by FFT at 1K / 2K / 4K (256 and 1024 channels, batch 1, 1 thread, alternating in
    # one process; 0.93-0.96x at batch 8), no kernel of length L; at 512 even, at 256 1.35x, so shorter
    # sequences keep the FFT (kernels/ssm_chunked/README.md). CPU without autograd (prefill,
    # evaluation) keeps the FFT with the SSM's cached kernel up to 16K; beyond, the reference's (H, N/2, L)
    # Vandermonde dominates:
    # bench/fftconv.py on a 2-core VM: state passing 0.51x the time, 0.26x the peak memory at 64K (0.9x,
    # 0.43x at 32K), but slower at 16K and below.
    if not u.is_cuda and torch.is_grad_enabled() and u.shape[-1] >= CPU_CHUNKED_FROM:
        return "chunked"
    limit = TRITON_MAX_LEN if u.is_cuda else CPU_STATE_PASSING_FROM
    return "state_passing" if u.shape[-1] > limit else "fftconv"


def ssm_conv(
    u: torch.Tensor, dtA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
    kernel_of: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A diagonal SSM over the whole of u: ``x_t = exp(dtA) x_{t-1} + dB u_t, y_t = 2 Re(C x_t) + D u_t``.

    Args:
        u: (B, H, L) input, any float dtype.
        dtA, dB, C: complex (H, N/2) discretised parameters (N/2 conjugate-pair modes; dtA = dt * A).
        D: (H,) skip weight or None.
        kernel_of: ``length -> ssm_kernel(dtA, dB, C, length)`` kept by the caller (``DiagonalSSM.kernel`` without
            autograd), used where this would build the kernel; None: built here.

    Returns:
        y: (B, H, L) in u's dtype. Differentiable in every input.
    """
    if u.dim() != 3 or dtA.shape != (u.shape[1], dtA.shape[-1]) or dB.shape != dtA.shape or C.shape != dtA.shape:
        raise ValueError(
            f"ssm_conv expects u (B, H, L) and dtA, dB, C (H, N/2), got u {tuple(u.shape)}, dtA {tuple(dtA.shape)}, "
            f"dB {tuple(dB.shape)}, C {tuple(C.shape)}"
        )
    path = ssm_conv_path(u)
    if path == "chunked":
        return ssm_conv_chunked(u, dtA, dB, C, D)
    if path == "state_passing":  # chunks of 8K: the fused kernel's limit on GPU
        return ssm_conv_state_passing(u, dtA, dB, C, D, chunk=TRITON_MAX_LEN, conv=fftconv)
    L = u.shape[-1]
    return fftconv(u, ssm_kernel(dtA, dB, C, L) if kernel_of is None else kernel_of(L), D)


def ssm_kernel(dtA: torch.Tensor, dB: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """Convolution kernel of a diagonal SSM, ``K[h, l] = 2 Re(sum_n C_n dB_n exp(dtA_n l))``.

    dtA, dB, C: complex (H, N/2) -> K: (H, length) real (fp32, fp64 for complex128). Chunked Vandermonde
    matmuls (``kernels.vandermonde``): no (H, N/2, L) tensor in forward or backward, on CPU and GPU alike.
    """
    return vandermonde(C * dB, dtA, length)
