"""The recurrence ``x_k = a_k * x_{k-1} + b_k`` one step at a time: the ground truth for the parallel scan."""

from __future__ import annotations

import torch


def linear_scan_ref(a: torch.Tensor, b: torch.Tensor, dim: int = 1, x0: torch.Tensor | None = None) -> torch.Tensor:
    """Every state of the recurrence, computed sequentially (L steps).

    Args:
        a: decays, broadcastable to b (real or complex); the sequence runs along `dim`.
        b: inputs (..., L, ...), real or complex.
        dim: the sequence dimension of b (a must have the same size there, or 1 for a constant decay).
        x0: initial state, b's shape without `dim`, or None for zeros.

    Returns:
        x: b's shape, ``x[k] = a[k] x[k-1] + b[k]`` with ``x[-1] = x0``.
    """
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)  # (L, ...)
    x = torch.zeros_like(b[0]) if x0 is None else x0.to(b.dtype)
    out = []
    for k in range(b.shape[0]):
        x = a[k] * x + b[k]
        out.append(x)
    return torch.stack(out).movedim(0, dim)
