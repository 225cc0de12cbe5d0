"""Attention: dense causal and block-sparse, as one functional op. The math is in this folder's README.md."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybrid_pretrain.kernels.attention.reference import attention_ref, expand_block_mask
from hybrid_pretrain.kernels.attention.triton_flash import flash_attention_triton

__all__ = ["attention", "attention_path", "attention_ref", "expand_block_mask", "flash_attention_triton"]


def attention_path(q: torch.Tensor, block_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> str:
    """Which backend ``attention`` uses: "triton", "sdpa" or "reference"."""
    if q.is_cuda and dropout_p == 0.0 and q.dtype != torch.float64:
        return "triton"  # tiled, O(L) memory, and skips masked blocks (SDPA's masks are dense (L, L) tensors)
    if block_mask is None:
        return "sdpa"  # CPU (its flash kernel is the fastest here), or dropout, which the Triton kernel lacks
    return "reference"  # a masked row may see no key: SDPA gives NaN there, the reference gives 0


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_mask: torch.Tensor | None = None,
    block: int = 64,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q kᵀ scale + mask) v.

    Args:
        q: (B, H, Lq, d); k, v: (B, H, Lk, d), any float dtype.
        causal: key j is visible to query i only if j <= i (top-left aligned, as SDPA's ``is_causal``).
        scale: score scale, default 1/sqrt(d).
        block_mask: (H or 1, ceil(Lq/block), ceil(Lk/block)) bool or None: key block J is visible to query
            block I only where it is True (combined with ``causal``). A query that sees no key outputs 0.
        block: block size of ``block_mask`` and the Triton tile (power of two >= 16).
        dropout_p: attention dropout (SDPA path only; the Triton kernel has none, so it is not used then).

    Returns:
        o: (B, H, Lq, d) in q's dtype. Differentiable in q, k, v.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"attention expects q (B, H, Lq, d) and k, v (B, H, Lk, d), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    path = attention_path(q, block_mask, dropout_p)
    if path == "triton":
        return flash_attention_triton(q, k, v, causal, scale, block_mask, block)
    if path == "sdpa":
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale)
    if dropout_p:
        raise ValueError("attention: dropout_p > 0 with a block_mask is not supported on CPU (reference path)")
    return attention_ref(q, k, v, causal, scale, block_mask, block)
