"""H3's multi-head memory (head size d > 1): each head keeps a d x d state, the SSM-filtered sum of k v^T.

Public op: ``ssm_memory(q, k, v, dtA, dB, C, D)``. Two exact algorithms, picked by shape:
- ``kv`` (``reference.py``, the definition): the (B, d, d, H, L) outer products through the diagonal SSM's
  convolution, then the query's readout. O(B d^2 H L log L): what long sequences need.
- ``quadratic`` (``quadratic.py``): per head (Q K^T * T_h) V with T_h the SSM's (L, L) Toeplitz matrix.
  O(B H L^2 d): cheaper while L is short against d^2 log L.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_pretrain.kernels.ssm_memory.quadratic import ssm_memory_quadratic
from hybrid_pretrain.kernels.ssm_memory.reference import ssm_memory_kv

__all__ = ["ssm_memory", "ssm_memory_path", "ssm_memory_kv", "ssm_memory_quadratic"]

def ssm_memory_path(q: torch.Tensor) -> str:
    """Which algorithm ``ssm_memory`` uses for q (B, H, d, L): "quadratic" or "kv"."""
    d, L = q.shape[-2:]
    # Forward + backward, fp32, one thread of the 2-core VM (quadratic / kv time): d 8 at L 32 / 64 / 96 / 128:
    # 0.45 / 0.57 / 0.71 / 1.1; d 16 at L 64 / 192 / 256: 0.23 / 0.29 / 0.57; d 4 at L 32 / 64: 1.1 / 2.4. The
    # quadratic form's (L, L) matmuls have inner size d, so they pay only for wide heads and short sequences.
    return "quadratic" if d >= 8 and L <= 12 * d else "kv"


def ssm_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtA: torch.Tensor, dB: torch.Tensor,
               C: torch.Tensor, D: torch.Tensor | None = None,
               kernel_of: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """``out[b, h, j, t] = sum_i q[b, h, i, t] sum_{s <= t} (K_h(t - s) + D_h [s = t]) k[b, h, i, s] v[b, h, j, s]``.

    Args:
        q, k, v: (B, H, d, L), channel i of head h at [:, h, i]: a view of channel-major (B, H * d, L).
        dtA, dB, C: complex (H, N/2), the heads' discretised diagonal SSMs (kernel K_h = ``ssm_kernel``).
        D: (H,) skip weight or None.
        kernel_of: ``length -> ssm_kernel(dtA, dB, C, length)`` kept by the caller (``DiagonalSSM.kernel`` without
            autograd), so evaluation and prefill do not rebuild the kernel per call (as ``ssm_conv``'s).

    Returns:
        (B, H, d, L) in q's dtype; the SSM part is computed in fp32. Differentiable in every input.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or dtA.shape[0] != q.shape[1]:
        raise ValueError(f"ssm_memory expects q, k, v (B, H, d, L) and dtA (H, N/2), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, dtA {tuple(dtA.shape)}")
    if ssm_memory_path(q) == "quadratic":
        return ssm_memory_quadratic(q, k, v, dtA, dB, C, D, kernel_of)
    return ssm_memory_kv(q, k, v, dtA, dB, C, D, kernel_of)
