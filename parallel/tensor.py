"""Tensor parallelism: sizes, sharding metadata and shard/gather of parameters, on megatron-core's groups.

A tensor-parallel parameter carries megatron-core's attributes (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``): megatron's own layers set them, and ``mark_sharded`` sets
them on ours (the per-channel SSMs of H3). DeepSpeed reads ``tensor_model_parallel`` to count a
sharded gradient once per rank and a replicated one once per group in the clipping norm, and
``shard``/``gather`` read the layout to move between one rank's slice and the single-rank tensor.

``partition_stride`` follows megatron: the full tensor is cut into ``TP x stride`` equal chunks along
``partition_dim`` and rank r holds chunks r, r + TP, r + 2 TP, ... (H3's output projection reads
channels laid out ``j * H + h``, so each rank's heads are ``head_dim`` strided chunks).

The sizes come from megatron-core's ``parallel_state`` only when it was initialised (by
``parallel.groups.initialize``); a model built without it (tests, generation, conversion) is a
single-rank model, so nothing here imports megatron-core on that path.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.ffn import FFNS
from hybrid_pretrain.models.mixers import MIXERS
from hybrid_pretrain.models.pattern import parse_pattern

_single_rank_depth = 0


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """Build layers as at TP=1 inside this block (the full model every rank shards from)."""
    global _single_rank_depth
    _single_rank_depth += 1
    try:
        yield
    finally:
        _single_rank_depth -= 1


def _parallel_state():
    """megatron-core's parallel_state if it holds initialised groups, else None (never imports it)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or _single_rank_depth or not ps.model_parallel_is_initialized():
        return None
    return ps


def tensor_parallel_size() -> int:
    ps = _parallel_state()
    return ps.get_tensor_model_parallel_world_size() if ps else 1


def tensor_parallel_rank() -> int:
    ps = _parallel_state()
    return ps.get_tensor_model_parallel_rank() if ps else 0


def tensor_parallel_group() -> dist.ProcessGroup | None:
    ps = _parallel_state()
    return ps.get_tensor_model_parallel_group() if ps else None


def local_size(n: int, what: str) -> int:
    """This rank's share of ``n`` features split across tensor-parallel ranks; ``what`` names them in errors."""
    tp = tensor_parallel_size()
    if n % tp:
        raise ConfigError(f"{what} ({n}) must be divisible by parallel.tensor ({tp})")
    return n // tp


def mark_sharded(module: nn.Module, dim: int = 0) -> nn.Module:
    """Declare every parameter of ``module`` split along ``dim`` across tensor-parallel ranks (no-op at TP=1)."""
    if tensor_parallel_size() > 1:
        # optional: megatron-core only at tensor-parallel size > 1
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        for p in module.parameters():
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=dim, stride=1)
    return module


def is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard(full: torch.Tensor, param: torch.Tensor, rank: int | None = None, size: int | None = None) -> torch.Tensor:
    """This rank's slice of the single-rank tensor ``full`` for ``param`` (``full`` itself if replicated)."""
    if not is_sharded(param):
        return full
    rank = tensor_parallel_rank() if rank is None else rank
    size = tensor_parallel_size() if size is None else size
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def gather(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The single-rank tensor from every tensor-parallel rank's slice (collective over the TP group)."""
    if not is_sharded(param) or tensor_parallel_size() == 1:
        return local
    size = tensor_parallel_size()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=tensor_parallel_group())
    return merge_shards(parts, param.partition_dim, getattr(param, "partition_stride", 1))


def merge_shards(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Every rank's slice (in rank order) -> the single-rank tensor; the inverse of ``shard``."""
    per_rank = [p.chunk(stride, dim=dim) for p in parts]  # rank r holds full chunks r, r + TP, ...
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


def check_model(model_cfg, tp: int) -> None:
    """Raise ConfigError for a model that cannot be split across ``tp`` tensor-parallel ranks.

    Layers opt in with a class attribute ``supports_tensor_parallel = True`` (their projections are
    column/row roles and their per-channel state is marked sharded); anything else is refused by name.
    """
    if tp == 1:
        return
    if model_cfg.arch != "lm":
        raise ConfigError(f"parallel.tensor={tp} supports model.arch 'lm' only, got '{model_cfg.arch}'")
    plan = parse_pattern(model_cfg.layers, model_cfg.ffn)
    for layer in plan.layers:
        for table, kind, name in ((MIXERS, "mixer", layer.mixer), (FFNS, "ffn", layer.ffn)):
            if not getattr(table.get(name), "supports_tensor_parallel", False):
                raise ConfigError(f"parallel.tensor={tp}: the {kind} '{name}' in model.layers/model.ffn has no "
                                  "tensor-parallel split yet; expected parallel.tensor=1 or layers from "
                                  "attention (A), h3 (H) with dense mlp (D) or mixture of experts (E)")
    checks = [("model.n_heads", model_cfg.n_heads), ("model.d_model", model_cfg.d_model),
              ("model.d_ffn (4 x d_model when 0)", model_cfg.ffn_dim),
              ("H3 heads, model.d_model / model.h3_head_dim", model_cfg.d_model // model_cfg.h3_head_dim)]
    if model_cfg.vocab_size % tp:
        padded = -(-model_cfg.vocab_size // tp) * tp
        raise ConfigError(f"model.vocab_size ({model_cfg.vocab_size}) must be divisible by parallel.tensor ({tp}); "
                          f"expected e.g. model.vocab_size={padded} (rows beyond the tokenizer's are never targets, "
                          "as in Megatron's padded vocabularies)")
    for what, n in checks:
        if n % tp:
            raise ConfigError(f"{what} ({n}) must be divisible by parallel.tensor ({tp})")
    if "E" in model_cfg.ffn and model_cfg.jitter > 0:
        # MoE layers are replicated across tensor ranks and must route identically; jitter draws per-rank noise.
        raise ConfigError(f"model.jitter={model_cfg.jitter} with parallel.tensor={tp}: every tensor rank must route "
                          "the same tokens, and router jitter draws random noise per rank; expected model.jitter=0")


def full_state(module: nn.Module, rename=None, grads: bool = False) -> dict[str, torch.Tensor]:
    """Single-rank names -> gathered tensors (or gradients) of ``module``; collective over the TP group."""
    rename = rename or (lambda name: name)
    out = {}
    for name, p in module.named_parameters():
        value = p.grad if grads else p.detach()
        if value is None:
            continue
        out[rename(name)] = gather(value, p)
    return out


def sharding_layout(module: nn.Module, rename=None) -> dict[str, list[int]]:
    """Single-rank name -> [partition_dim, partition_stride] of this rank's sharded parameters."""
    rename = rename or (lambda name: name)
    return {rename(name): [p.partition_dim, getattr(p, "partition_stride", 1)]
            for name, p in module.named_parameters() if is_sharded(p)}


def grad_norm(params: list[torch.Tensor]) -> float:
    """The L2 norm of the whole model's gradient from this rank's parameters: sharded gradients summed over
    the tensor-parallel group, replicated ones counted once (DeepSpeed's ZeRO-0 clipping rule)."""
    tp = tensor_parallel_size()
    if tp == 1:
        return torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    first = tensor_parallel_rank() == 0
    squares = sum((p.grad.float().pow(2).sum() for p in params if is_sharded(p) or first), torch.zeros(()))
    dist.all_reduce(squares, group=tensor_parallel_group())
    return squares.sqrt().item()
