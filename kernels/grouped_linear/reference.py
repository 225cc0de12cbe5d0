"""Grouped linear layer as one ``F.linear`` per group on its slice of rows: the reference, by definition."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grouped_linear_ref(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                       sizes: Sequence[int]) -> torch.Tensor:
    """x (N, K) cut into ``sizes`` row groups; group g times weights[g] (M, K) plus biases[g] (M,) -> (N, M).

    Every group runs, empty ones included, so every weight gets a gradient (zeros for an empty group).
    """
    parts = x.split(list(sizes))  # G views (sizes[g], K)
    return torch.cat([F.linear(p, w, b) for p, w, b in zip(parts, weights, biases, strict=True)])  # (N, M)
