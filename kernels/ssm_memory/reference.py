"""H3's multi-head memory by its definition: the d x d outer products k v^T per position, each entry run
through the head's diagonal SSM, then read out by the query. O(B d^2 H L log L) and (B, d, d, H, L) tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_pretrain.kernels.fftconv import ssm_conv


def ssm_memory_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtA: torch.Tensor, dB: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor | None = None,
                  kernel_of: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """q, k, v (B, H, d, L); dtA, dB, C complex (H, N/2); D (H,); kernel_of as ``ssm_conv``'s -> (B, H, d, L), see
    ``ssm_memory``."""
    B, H, d, L = k.shape
    # contiguous (B, d, H, L) factors, so the (B, d, d, H, L) products come out contiguous
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    kv = k.unsqueeze(2) * v.unsqueeze(1)  # (B, d_i, d_j, H, L)
    y = ssm_conv(kv.view(B * d * d, H, L), dtA, dB, C, D, kernel_of).view(B, d, d, H, L)  # each entry's memory
    return (y * q.unsqueeze(2)).sum(1).transpose(1, 2)  # sum_i q_i memory_ij: (B, H, d_j, L)
