"""Projection factory: models declare a projection's role, this module decides what it becomes.

At tensor-parallel size 1 every role is a plain ``nn.Linear``. Column-parallel projections split
their output features across tensor-parallel ranks, row-parallel ones their input features; at
TP > 1 they become megatron-core layers (issue 5), so model code never changes.
"""

from __future__ import annotations

from torch import nn


def column_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection whose output features may be split across tensor-parallel ranks (e.g. QKV, MLP up)."""
    return nn.Linear(in_features, out_features, bias=bias)


def row_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection whose input features may be split across tensor-parallel ranks (e.g. attention out, MLP down)."""
    return nn.Linear(in_features, out_features, bias=bias)


def replicated_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection every rank holds whole (small or routing layers)."""
    return nn.Linear(in_features, out_features, bias=bias)
