"""Sequence parallelism (Korthikanti et al. 2022): the activations between tensor-parallel regions, split by position.

With tensor parallelism alone every rank holds the whole (B, L, D) residual stream, its layer-norm
inputs and outputs: identical copies. Sequence parallelism keeps only ``L / TP`` positions of them per
rank. A column-parallel projection first all-gathers the sequence (its backward reduce-scatters the
input gradient), a row-parallel projection reduce-scatters its partial sums along the sequence
instead of all-reducing them (its backward all-gathers), the vocab-parallel embedding
reduce-scatters its lookup, and the head gathers the sequence back for the vocab-parallel loss. The
mixers (attention, H3's convolutions) sit between a column and a row projection, so they see every
position. Layer norms and row-projection biases are replicated but each rank applies them to its own
positions only, so their gradients are summed over the tensor group (``sum_grad``).

Why hand-written collectives rather than megatron-core's ``gather_from_sequence_parallel_region`` /
``reduce_scatter_to_sequence_parallel_region`` and its layers' ``sequence_parallel=True``: those act on
dim 0 (megatron's sequence-first layout, ours is batch-first), allocate their outputs on
``torch.cuda.current_device()`` (no CPU path) and its norms need Apex/Transformer Engine. The
functions below are the same maps along any dim on ``all_gather_single`` / ``reduce_scatter_single``
(torch's names for ``all_gather_into_tensor`` / ``reduce_scatter_tensor``), which gloo and NCCL provide.

The switch is process state like megatron-core's groups: ``set_enabled`` (from the run's
``parallel.sequence_parallel``) before the model is built; it is on only where the tensor-parallel size
is > 1, so ``parallel.tensor.single_rank()`` builds a plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.parallel.tensor import tensor_parallel_group, tensor_parallel_size

SEQUENCE_DIM = 1  # our activations are batch-first (B, L, D)
_enabled = False


def set_enabled(enabled: bool) -> None:
    """Turn sequence parallelism on or off for the layers and model boundaries built (and run) after this."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    """True when activations between tensor-parallel regions are split along the sequence."""
    return _enabled and tensor_parallel_size() > 1


def check_model(model_cfg, tp: int, seq_len: int, zero_stage: int = 0) -> None:
    """Raise ConfigError where ``parallel.sequence_parallel`` cannot run (called with the flag on)."""
    if tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor >= 2 (it splits the sequence "
                          "across the tensor-parallel ranks); expected parallel.tensor >= 2 or "
                          "parallel.sequence_parallel=false")
    if seq_len % tp:
        raise ConfigError(f"data.seq_len ({seq_len}) must be divisible by parallel.tensor ({tp}) with "
                          "parallel.sequence_parallel=true (each rank holds seq_len / tensor positions)")
    if zero_stage == 3:
        # H3 multiplies by its q, k and v weights stacked (parallel.linear.shared_input), outside the projections'
        # own forward, where ZeRO-3 has not gathered them.
        raise ConfigError("parallel.sequence_parallel with train.zero_stage=3 is not supported (H3 reads its q/k/v "
                          "weights together, which ZeRO-3 keeps partitioned); expected train.zero_stage <= 2")
    # Which mixers and feed-forwards may run is tensor.check_model's rule: every layer with a tensor-parallel
    # split (attention, H3, dense MLP) reads through column projections and writes through row projections,
    # which is all sequence parallelism needs; the other mixers are refused there, MoE feed-forwards here.
    if "E" in model_cfg.ffn:
        raise ConfigError(f"parallel.sequence_parallel with MoE layers (model.ffn '{model_cfg.ffn}') is not "
                          "supported (the router would see one tensor rank's positions only); expected "
                          "parallel.sequence_parallel=false")


def rank_major(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """(..., size * n, ...) -> (size, ..., n, ...) contiguous: entry r is rank r's positions along ``dim``."""
    if x.shape[dim] % size:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by the tensor-parallel size {size}")
    return x.unflatten(dim, (size, -1)).movedim(dim, 0).contiguous()


def from_rank_major(parts: torch.Tensor, dim: int) -> torch.Tensor:
    """(size, ..., n, ...) -> (..., size * n, ...): the inverse of ``rank_major``."""
    return parts.movedim(0, dim).flatten(dim, dim + 1)


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's x (..., n, ...) -> (..., T * n, ...), rank r's positions at [r n, (r + 1) n) along ``dim``."""
    size = dist.get_world_size(group)
    parts = x.new_empty((size * x.shape[0], *x.shape[1:]))  # gloo wants the ranks stacked along dim 0
    dist.all_gather_single(parts, x.contiguous(), group=group)
    return from_rank_major(parts.unflatten(0, (size, -1)), dim)  # (T, ..., n, ...) -> (..., T n, ...)


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """x (..., T * n, ...) on every rank -> the sum over ranks of this rank's positions (..., n, ...)."""
    parts = rank_major(x, dist.get_world_size(group), dim)  # (T, ..., n, ...)
    out = x.new_empty(parts.shape[1:])
    dist.reduce_scatter_single(out, parts.flatten(0, 1), group=group)  # ranks stacked along dim 0, as gloo wants
    return out


class _GatherSequence(torch.autograd.Function):
    """Forward all-gather along ``dim``; backward reduce-scatter (every rank used every position)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward reduce-scatter along ``dim``; backward all-gather (each position's sum fed every rank's part)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatheredLinear(torch.autograd.Function):
    """``F.linear`` of the gathered sequence that keeps only this rank's positions for the backward pass.

    Megatron's sequence-parallel linear, written out for a batch-first CPU/GPU path: storing the gathered
    (B, L, in) input, as ``F.linear(gather(x))`` would, costs more than sequence parallelism saves, so the
    backward all-gathers x again to form the weight gradient and reduce-scatters the input gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dim: int, group):
        ctx.save_for_backward(x, weight)
        ctx.dim, ctx.group, ctx.has_bias = dim, group, bias is not None
        return F.linear(_all_gather(x, dim, group), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _reduce_scatter(grad @ weight, ctx.dim, ctx.group) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            full = _all_gather(x, ctx.dim, ctx.group).flatten(0, -2)  # (B L, in)
            grad_w = grad.flatten(0, -2).T @ full  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.flatten(0, -2).sum(0)
        return grad_x, grad_w, grad_b, None, None


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    dim: int = SEQUENCE_DIM, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's positions x (B, L / TP, in) -> ``F.linear`` over the whole sequence (B, L, out).

    Equal to ``F.linear(gather(x), weight, bias)`` but keeps only x for the backward pass.
    """
    return _GatheredLinear.apply(x, weight, bias, dim, group or tensor_parallel_group())


def gather(x: torch.Tensor, dim: int = SEQUENCE_DIM, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's positions (B, L / TP, ...) -> the whole sequence (B, L, ...); backward reduce-scatters."""
    return _GatherSequence.apply(x, dim, group or tensor_parallel_group())


def reduce_scatter(x: torch.Tensor, dim: int = SEQUENCE_DIM, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Partial sums over the whole sequence (B, L, ...) -> their total at this rank's positions (B, L / TP, ...)."""
    return _ReduceScatterSequence.apply(x, dim, group or tensor_parallel_group())


def sum_grad(param: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``param`` unchanged; its gradient summed over the tensor group (megatron-core's copy-to-region map)."""
    # optional: megatron-core only at tensor-parallel size > 1
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(param, group=group or tensor_parallel_group())


class SequenceParallelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over this rank's positions; weight and bias gradients summed over the tensor group.

    Same parameters and state-dict keys as ``nn.LayerNorm``; the all-reduce lives in autograd
    (``sum_grad``), so no DeepSpeed hook is involved and every tensor rank ends with the full gradient.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else sum_grad(self.weight)
        bias = None if self.bias is None else sum_grad(self.bias)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def layer_norm(d_model: int, eps: float) -> nn.LayerNorm:
    """The norm between tensor-parallel regions: ``nn.LayerNorm``, or its sequence-parallel form when enabled."""
    cls = SequenceParallelLayerNorm if is_enabled() else nn.LayerNorm
    return cls(d_model, eps=eps)

