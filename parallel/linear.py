"""Projection factory: models declare a projection's role, this module decides what it becomes.

At tensor-parallel size 1 every role is a plain ``nn.Linear`` (bit-identical to a model that never
heard of parallelism). At TP > 1 column-parallel projections become megatron-core's
``ColumnParallelLinear`` (each rank computes a slice of the output features, kept split for the
next layer) and row-parallel ones ``RowParallelLinear`` (each rank reads its slice of the input
features; the partial products are all-reduced and the bias added once). Both are wrapped to
return a plain tensor, as ``nn.Linear`` does, so model code never changes.

Under sequence parallelism (``parallel.sequence``) a column projection reads this rank's positions and
gathers the whole sequence first, and a row projection reduce-scatters its sums to this rank's
positions instead of all-reducing them; the weights, their sharding and the state dict are unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.parallel import sequence
from hybrid_pretrain.parallel.tensor import tensor_parallel_size


def column_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection whose output features are split across tensor-parallel ranks (e.g. QKV, MLP up).

    At TP > 1 it returns this rank's ``out_features / TP`` contiguous outputs; under sequence parallelism
    it reads this rank's positions (B, L / TP, in) and returns every position's outputs (B, L, out / TP).
    """
    if tensor_parallel_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    layer = _parallel_classes()[0](in_features, out_features, config=_megatron_config(), init_method=_init,
                                   bias=bias, gather_output=False, skip_bias_add=False)
    layer.sequence_parallel_input = sequence.is_enabled()
    return layer


def row_linear(in_features: int, out_features: int, bias: bool = True, stride: int = 1) -> nn.Module:
    """A projection whose input features are split across tensor-parallel ranks (e.g. attention out, MLP down).

    At TP > 1 it reads this rank's ``in_features / TP`` inputs (the output of a column projection) and
    returns the full output on every rank. ``stride`` > 1: the rank's inputs are ``stride`` interleaved
    chunks of the full input (megatron's partition stride), for layouts like H3's ``j * H + h``. Under
    sequence parallelism it returns this rank's positions only (B, L / TP, out).
    """
    if tensor_parallel_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    layer = _parallel_classes()[1](in_features, out_features, config=_megatron_config(), init_method=_init,
                                   bias=bias, input_is_parallel=True, skip_bias_add=False, stride=stride)
    layer.sequence_parallel_output = sequence.is_enabled()
    return layer


def shared_input(x: torch.Tensor, projections: list[nn.Module]) -> list[torch.Tensor]:
    """``[p(x) for p in projections]`` for column projections that read the same x (H3's q, k and v).

    Under sequence parallelism the sequence is gathered once for all of them (one matmul against their
    stacked weights) instead of once per projection; elsewhere it is exactly the list above.
    """
    if not all(getattr(p, "sequence_parallel_input", False) for p in projections):
        return [p(x) for p in projections]
    weight = torch.cat([p.weight for p in projections])  # (sum out / TP, in)
    biases = [p.bias for p in projections]
    bias = None if any(b is None for b in biases) else torch.cat(biases)
    y = sequence.gathered_linear(x, weight, bias)  # (B, L, sum out / TP)
    return list(y.split([p.weight.shape[0] for p in projections], dim=-1))


def replicated_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection every rank holds whole (small or routing layers)."""
    return nn.Linear(in_features, out_features, bias=bias)


def _init(weight: torch.Tensor) -> None:
    """GPT-2's N(0, 0.02); a TP run loads its weights sliced from the single-rank model anyway."""
    nn.init.normal_(weight, std=0.02)


def _megatron_config():
    from megatron.core import ModelParallelConfig  # optional: megatron-core only at tensor-parallel size > 1

    # CPU initialisation builds the whole matrix once and keeps this rank's slice (works without CUDA).
    return ModelParallelConfig(tensor_model_parallel_size=tensor_parallel_size(), use_cpu_initialization=True,
                               params_dtype=torch.float32)


@functools.cache
def _parallel_classes() -> tuple[type[nn.Module], type[nn.Module]]:
    """megatron-core's layers return ``(output, bias)``; these subclasses return the output only.

    Under sequence parallelism they compute the matmul themselves around ``parallel.sequence``'s
    collectives: megatron's own ``sequence_parallel=True`` path gathers along dim 0 (sequence-first
    activations) into a CUDA buffer, so it cannot serve batch-first CPU runs.
    """
    # optional: megatron-core only at tensor-parallel size > 1
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnParallel(ColumnParallelLinear):
        sequence_parallel_input = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if not self.sequence_parallel_input:
                return super().forward(x)[0]
            # Backward reduce-scatters dx: it replaces megatron's all-reduce of the input gradient.
            return sequence.gathered_linear(x, self.weight, self.bias)  # (B, L, out / TP)

    class RowParallel(RowParallelLinear):
        sequence_parallel_output = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if not self.sequence_parallel_output:
                return super().forward(x)[0]
            y = sequence.reduce_scatter(F.linear(x, self.weight))  # (B, L / TP, out)
            # The replicated bias meets only this rank's positions: its gradient is summed over the group.
            return y if self.bias is None else y + sequence.sum_grad(self.bias)

    return ColumnParallel, RowParallel
