"""Grouped linear layer: each group of consecutive rows through its own weights (mixture-of-experts matmuls).

Public op: ``grouped_linear(x, weights, biases, sizes)``. Dropless MoE layers sort their token-expert
assignments by expert and call it once per projection, so each expert multiplies exactly its tokens:
no capacity padding, no dropped tokens. The math and the measured choice of path are in README.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybrid_pretrain.kernels.grouped_linear.loop import grouped_linear_loop
from hybrid_pretrain.kernels.grouped_linear.reference import grouped_linear_ref
from hybrid_pretrain.kernels.grouped_linear.torch_grouped_mm import grouped_linear_grouped_mm

__all__ = ["grouped_linear", "grouped_linear_path", "grouped_linear_ref", "grouped_linear_loop",
           "grouped_linear_grouped_mm", "PATHS"]

PATHS = {"loop": grouped_linear_loop, "grouped_mm": grouped_linear_grouped_mm, "reference": grouped_linear_ref}


def grouped_linear_path(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> str:
    """Which implementation ``grouped_linear`` uses for x: "grouped_mm" or "loop"."""
    m, k = weights[0].shape
    # CUDA, bf16, 16-byte-aligned rows: torch's grouped_mm is one CUTLASS grouped GEMM (sm90+) for all groups
    # instead of 2 x G kernel launches. Elsewhere grouped_mm is itself a loop of mm behind a stack of the
    # separate expert weights, which bench/moe.py measures slower than the loop on CPU (section 3).
    if x.is_cuda and x.dtype == torch.bfloat16 and k % 8 == 0 and m % 8 == 0:
        return "grouped_mm"
    return "loop"


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                   sizes: Sequence[int], path: str | None = None) -> torch.Tensor:
    """Rows of x in consecutive groups, each group through its own linear layer.

    Args:
        x: (N, K) rows sorted by group: the first sizes[0] rows are group 0, and so on.
        weights: G tensors (M, K), one per group (``F.linear`` layout).
        biases: G tensors (M,).
        sizes: G non-negative ints summing to N (a host-side list: split sizes are needed on the host anyway).
        path: force "loop", "grouped_mm" or "reference" (benchmarks and tests); None picks by
            ``grouped_linear_path``.

    Returns:
        y: (N, M), ``y[rows of g] = x[rows of g] @ weights[g].T + biases[g]``. Differentiable in x, weights and
        biases; an empty group's weights get zero gradients.
    """
    if x.dim() != 2 or len(weights) != len(sizes) or len(biases) != len(sizes) or sum(sizes) != x.shape[0]:
        raise ValueError(f"grouped_linear expects x (N, K) and G weights, biases and sizes summing to N; got x "
                         f"{tuple(x.shape)}, {len(weights)} weights, {len(biases)} biases, sizes {list(sizes)}")
    return PATHS[path or grouped_linear_path(x, weights)](x, weights, biases, sizes)
