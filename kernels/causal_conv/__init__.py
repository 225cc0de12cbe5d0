"""Short causal depthwise convolution: H3's shift SSM, whose kernel is its N taps C (zero beyond them).

Public op: ``causal_conv(u, k, D)``. A W-tap filter costs O(L W) per channel, not an FFT over L, and
keeps nothing complex for backward. In half precision on GPU it is one grouped ``conv1d`` (cuDNN);
otherwise block-Toeplitz matmuls (``toeplitz.py``), because oneDNN's depthwise convolution with 64 taps
is slow on CPU. ``reference.py`` has the definition; the math is in this folder's README.md.
Precision: the dense path computes in fp32; conv1d and block-Toeplitz in u's dtype (bf16 products, fp32
accumulation inside oneDNN/cuDNN), within 2x of bf16's own rounding (kernels/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_pretrain.kernels.causal_conv.dense import causal_conv_dense, dense_pays
from hybrid_pretrain.kernels.causal_conv.reference import causal_conv_ref
from hybrid_pretrain.kernels.causal_conv.toeplitz import causal_conv_toeplitz

__all__ = [
    "causal_conv", "causal_conv_conv1d", "causal_conv_dense", "causal_conv_path", "causal_conv_ref",
    "causal_conv_toeplitz", "dense_pays",
]


def causal_conv_path(u: torch.Tensor) -> str:
    """Which backend ``causal_conv`` uses for u: "conv1d" (cuDNN), "dense" or "toeplitz"."""
    # GPU: cuDNN's depthwise kernel for bf16/fp16; fp32 stays on matmuls, which keep full fp32 products
    # (cuDNN convolutions default to TF32). CPU: oneDNN's depthwise conv1d with 64 taps ran 1.7-2.3x slower
    # than the block-Toeplitz matmuls (bench/h3_layer.py --ops, 2-core VM); many short sequences go
    # through one dense (L, L) matmul instead (``dense_pays``).
    if u.is_cuda and u.dtype in (torch.bfloat16, torch.float16):
        return "conv1d"
    return "dense" if dense_pays(u) else "toeplitz"


def causal_conv_conv1d(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """u (B, H, L), k (H, W) -> y (B, H, L) by one grouped conv1d."""
    W = k.shape[-1]
    weight = k.flip(-1).unsqueeze(1).to(u.dtype)  # (H, 1, W): conv1d correlates, so the taps run backwards
    # Padding W - 1 on both sides; the first L outputs are the causal ones (the last W - 1 see the right padding).
    return F.conv1d(u, weight, padding=W - 1, groups=k.shape[0])[..., : u.shape[-1]]


def causal_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """``y[b, h, t] = sum_{j < W} k[h, j] u[b, h, t - j] + D[h] u[b, h, t]``, zeros before the start.

    Args:
        u: (B, H, L) input.
        k: (H, W) causal taps, k[:, 0] weighting the current step.
        D: (H,) skip weight or None.

    Returns:
        y: (B, H, L) in u's dtype. Differentiable in u, k and D.
    """
    if u.dim() != 3 or k.dim() != 2 or k.shape[0] != u.shape[1]:
        raise ValueError(f"causal_conv expects u (B, H, L) and k (H, W), got u {tuple(u.shape)} and k {tuple(k.shape)}")
    if D is not None:  # the skip is one more weight on the current step
        k = torch.cat([k[:, :1] + D.unsqueeze(-1), k[:, 1:]], dim=-1)
    path = causal_conv_path(u)
    if path == "conv1d":
        return causal_conv_conv1d(u, k)
    if path == "dense":
        return causal_conv_dense(u, k)
    return causal_conv_toeplitz(u, k)
