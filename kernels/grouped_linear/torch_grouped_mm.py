"""Grouped linear layer through torch's ``F.grouped_mm`` (one CUTLASS grouped GEMM on sm90+ GPUs in bf16)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grouped_linear_grouped_mm(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                              sizes: Sequence[int]) -> torch.Tensor:
    """Same contract as ``grouped_linear_ref``; the weights are stacked per call (they are separate parameters)."""
    sizes_t = torch.tensor(list(sizes), device=x.device)
    offs = sizes_t.cumsum(0).to(torch.int32)  # (G,) end row of each group
    w = torch.stack(list(weights)).transpose(1, 2)  # (G, K, M): grouped_mm wants (K, M) per group
    y = F.grouped_mm(x, w, offs=offs)  # (N, M)
    if y.requires_grad:
        # Its backward rejects a stride-0 gradient (what ``y.sum().backward()`` sends) in torch 2.13.
        y.register_hook(torch.Tensor.contiguous)
    # grouped_mm takes no bias yet ("Bias not supported yet" in torch 2.13): add each group's row by row.
    bias = torch.stack(list(biases)).repeat_interleave(sizes_t, dim=0, output_size=x.shape[0])  # (N, M)
    return y + bias.to(y.dtype)
