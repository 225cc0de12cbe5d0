"""Pure-PyTorch attention with an explicit (Lq, Lk) score matrix: what the Triton kernels are tested against."""

from __future__ import annotations

import math

import torch


def expand_block_mask(block_mask: torch.Tensor, block: int, Lq: int, Lk: int) -> torch.Tensor:
    """(H or 1, ceil(Lq/block), ceil(Lk/block)) bool -> the element mask (H or 1, Lq, Lk): True = may attend."""
    return block_mask.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :Lq, :Lk]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_mask: torch.Tensor | None = None,
    block: int = 64,
) -> torch.Tensor:
    """softmax(q kᵀ * scale + mask) v, in fp32 (fp64 for fp64 inputs), cast back to q's dtype.

    q: (B, H, Lq, d); k, v: (B, H, Lk, d); causal: key j visible to query i iff j <= i (top-left aligned,
    as ``scaled_dot_product_attention(is_causal=True)``); block_mask: (H or 1, ceil(Lq/block), ceil(Lk/block))
    bool, key block J visible to query block I iff block_mask[h, I, J]. A query that sees no key gets 0.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    Lq, Lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q.to(dtype), k.to(dtype)) * scale  # (B, H, Lq, Lk)
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.tril(visible)
    if block_mask is not None:
        visible = visible & expand_block_mask(block_mask.to(q.device), block, Lq, Lk)  # (H or 1, Lq, Lk)
    scores = scores.masked_fill(~visible, float("-inf"))
    # Rows with no visible key would be exp(-inf) / 0 = NaN: give them zero weights (and zero gradients).
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhij,bhjd->bhid", p, v.to(dtype)).to(q.dtype)
