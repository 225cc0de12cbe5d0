"""Projection factory: models declare a projection's role, this module decides what it becomes.

At tensor-parallel size 1 every role is a plain ``nn.Linear`` (bit-identical to a model that never
heard of parallelism). At TP > 1 column-parallel projections become megatron-core's
``ColumnParallelLinear`` (each rank computes a slice of the output features, kept split for the
next layer) and row-parallel ones ``RowParallelLinear`` (each rank reads its slice of the input
features; the partial products are all-reduced and the bias added once). Both are wrapped to
return a plain tensor, as ``nn.Linear`` does, so model code never changes.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from parallel.tensor import tensor_parallel_size


def column_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection whose output features are split across tensor-parallel ranks (e.g. QKV, MLP up).

    At TP > 1 it returns this rank's ``out_features / TP`` contiguous outputs.
    """
    if tensor_parallel_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return _parallel_classes()[0](in_features, out_features, config=_megatron_config(), init_method=_init,
                                  bias=bias, gather_output=False, skip_bias_add=False)


def row_linear(in_features: int, out_features: int, bias: bool = True, stride: int = 1) -> nn.Module:
    """A projection whose input features are split across tensor-parallel ranks (e.g. attention out, MLP down).

    At TP > 1 it reads this rank's ``in_features / TP`` inputs (the output of a column projection) and
    returns the full output on every rank. ``stride`` > 1: the rank's inputs are ``stride`` interleaved
    chunks of the full input (megatron's partition stride), for layouts like H3's ``j * H + h``.
    """
    if tensor_parallel_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return _parallel_classes()[1](in_features, out_features, config=_megatron_config(), init_method=_init,
                                  bias=bias, input_is_parallel=True, skip_bias_add=False, stride=stride)


def replicated_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection every rank holds whole (small or routing layers)."""
    return nn.Linear(in_features, out_features, bias=bias)


def _init(weight: torch.Tensor) -> None:
    """GPT-2's N(0, 0.02); a TP run loads its weights sliced from the single-rank model anyway."""
    nn.init.normal_(weight, std=0.02)


def _megatron_config():
    from megatron.core import ModelParallelConfig

    # CPU initialisation builds the whole matrix once and keeps this rank's slice (works without CUDA).
    return ModelParallelConfig(tensor_model_parallel_size=tensor_parallel_size(), use_cpu_initialization=True,
                               params_dtype=torch.float32)


@functools.cache
def _parallel_classes() -> tuple[type[nn.Module], type[nn.Module]]:
    """megatron-core's layers return ``(output, bias)``; these subclasses return the output only."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnParallel(ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    class RowParallel(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return ColumnParallel, RowParallel
