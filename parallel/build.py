"""The model this rank trains: the single-rank model, or its tensor slice and/or pipeline stage.

Every layout starts from the same weights: at TP or PP > 1 each rank first builds the whole
single-rank model from the run's seed and keeps its own slice and stage of it, so a TP/PP run starts
exactly where a single-rank run does (the equivalence tests rely on this) and no layer needs a
rank-aware initialiser. The cost is one transient copy of the full fp32 weights per rank at start-up.
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.parallel import rng, sequence
from hybrid_pretrain.parallel.expert import parallelize_experts
from hybrid_pretrain.parallel.pipeline import build_pipeline
from hybrid_pretrain.parallel.tensor import load_full_state, single_rank, tensor_parallel_rank


def build_model(model_cfg, parallel_cfg, seed: int, dp_size: int) -> nn.Module:
    """An ``nn.Module`` for DeepSpeed: the arch (TP slice included) or, at PP > 1, a PipelineModule stage."""

    checkpointing = getattr(parallel_cfg, "activation_checkpointing", False)
    tp, pp = parallel_cfg.tensor, parallel_cfg.pipeline
    torch.manual_seed(seed)  # identical initial weights on every rank
    if tp == 1 and pp == 1:
        model = build_arch(model_cfg)
        _set_checkpointing(model, checkpointing)
    else:
        with single_rank():
            full = build_arch(model_cfg).state_dict()
        if pp > 1:
            model = build_pipeline(model_cfg, pp, tp, dp_size, checkpointing)
            load_full_state(model, full, model.lm_name)
        else:
            model = build_arch(model_cfg)
            load_full_state(model, full)
            _set_checkpointing(model, checkpointing)
    if tp > 1 and model_cfg.dropout > 0:  # per-rank masks where the tensor ranks hold different slices

        rng.split_dropout_regions(model, tensor_parallel_rank(), sequence.is_enabled())
    # Expert-parallel ranks keep E/EP experts of each MoE layer, cut after the single-rank weights are in.
    return parallelize_experts(model, parallel_cfg.expert)


def _set_checkpointing(model: nn.Module, enabled: bool) -> None:
    if enabled and not hasattr(model, "checkpoint_activations"):
        raise ConfigError(f"parallel.activation_checkpointing: model.arch builds a {type(model).__name__}, "
                          "which has no activation checkpointing; expected model.arch 'lm'")
    if enabled:
        model.checkpoint_activations = True
