"""H3's multi-head memory as a quadratic form, for short sequences: masked linear attention whose mask is the
SSM's Toeplitz matrix.

    out[b, j, h, t] = sum_i q_i(t) sum_{s <= t} K_h(t - s) k_i(s) v_j(s)        (K_h(0) includes the skip D_h)
                    = sum_s [(q(t) . k(s)) T_h[t, s]] v_j(s)                       T_h = toeplitz(K_h)

Per head that is (Q K^T * T_h) V: two (L, L) matmuls of inner size d, O(B H L^2 d), against the outer-product
route's O(B d^2 H L) products and an SSM convolution of d^2 channels, with (B, d, d, H, L) tensors kept for
backward. Below a few hundred positions (H3's synthetic tasks) the quadratic form is much cheaper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid_pretrain.kernels.causal_conv.dense import toeplitz_matrix
from hybrid_pretrain.kernels.fftconv import ssm_kernel


def ssm_memory_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtA: torch.Tensor, dB: torch.Tensor,
                         C: torch.Tensor, D: torch.Tensor | None = None,
                         kernel_of: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Same contract as ``ssm_memory_kv``; computed in fp32 (fp64 for fp64 inputs), returned in q's dtype."""
    L = q.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # The fp32 island of the SSM path (kernels/README.md): no autocast inside.
    with torch.autocast(q.device.type, enabled=False):
        K = ssm_kernel(dtA, dB, C, L) if kernel_of is None else kernel_of(L)  # (H, L)
        mask = toeplitz_matrix(K, D, L, dtype)  # (H, L, L)
        # (B, H, d, L) each: the matmuls take the transposes as they are
        scores = torch.matmul(q.to(dtype).transpose(-1, -2), k.to(dtype)) * mask  # (B, H, L_t, L_s)
        # scores V^T as (B, H, L_t, d_j), returned as its (B, H, d_j, L_t) view: in this order backward's gradient
        # of `scores` is a contiguous matmul output, and its product with the mask streams; as V scores^T it was a
        # transposed view and that product ran ~5x slower (the whole readout: 4.3 -> 3.6 ms fwd + bwd at
        # (32, 4, 8, 63), one thread)
        out = torch.matmul(scores, v.to(dtype).transpose(-1, -2)).transpose(-1, -2)  # (B, H, d_j, L_t)
    return out.to(q.dtype)
