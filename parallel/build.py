"""The model this rank trains: the single-rank model, or its tensor slice, pipeline stage and experts.

Every layout starts from the same weights, and a rank makes only its own share of them: the rank's
model is built on the meta device (no memory), its MoE layers keep this rank's experts, and
``parallel.materialize`` then gives each parameter its slice of the single-rank model's initial value,
module by module from per-module seeds (``models.init``). So a TP/PP/EP run starts exactly where a
single-rank run from the same seed does (the equivalence tests rely on this), no layer needs a
rank-aware initialiser, and no rank ever holds the whole model (bench/startup_memory.py measures it).

Architectures other than ``lm`` (single-rank only, or expert-parallel) are built whole and their experts
cut afterwards: their whole-model init does more than per-module steps (Atlas copies its retriever into
a frozen tower), so a module alone would not get the single-rank value.
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.parallel import rng, sequence
from hybrid_pretrain.parallel.expert import expert_parallel_rank, parallelize_experts, single_rank_expert_name
from hybrid_pretrain.parallel.materialize import materialize
from hybrid_pretrain.parallel.pipeline import build_pipeline
from hybrid_pretrain.parallel.tensor import single_rank, tensor_parallel_rank


def build_model(model_cfg, parallel_cfg, seed: int, dp_size: int, ep_rank: int | None = None) -> nn.Module:
    """An ``nn.Module`` for DeepSpeed: the arch (TP slice included) or, at PP > 1, a PipelineModule stage.

    ``ep_rank``: which expert-parallel rank's experts to keep; None reads it from the process groups.
    """
    checkpointing = getattr(parallel_cfg, "activation_checkpointing", False)
    tp, pp, ep = parallel_cfg.tensor, parallel_cfg.pipeline, parallel_cfg.expert
    if model_cfg.arch != "lm":
        torch.manual_seed(seed)  # the model's init seed (models.init), the same on every rank
        model = build_arch(model_cfg)
        _set_checkpointing(model, checkpointing)
        return parallelize_experts(model, ep, ep_rank)
    torch.manual_seed(seed)
    with single_rank(), torch.device("meta"):
        reference = build_arch(model_cfg)  # the single-rank model's names, shapes and init, without memory
    n_local, rank = model_cfg.num_experts // ep, expert_parallel_rank(ep) if ep_rank is None else ep_rank

    def keep_own_share(local: nn.Module) -> None:
        parallelize_experts(local, ep, rank)
        to_pipe = getattr(local, "lm_name", lambda name: name)
        materialize(local, reference, reference.weight_init.module,
                    rename=lambda name: to_pipe(single_rank_expert_name(name, rank, n_local)))

    if pp > 1:
        model = build_pipeline(model_cfg, pp, tp, dp_size, checkpointing, keep_own_share)
    else:
        torch.manual_seed(seed)  # the same init seed as the reference's
        with torch.device("meta"):
            model = build_arch(model_cfg)
        keep_own_share(model)
        _set_checkpointing(model, checkpointing)
    if tp > 1 and model_cfg.dropout > 0:  # per-rank masks where the tensor ranks hold different slices
        rng.split_dropout_regions(model, tensor_parallel_rank(), sequence.is_enabled())
    return model


def _set_checkpointing(model: nn.Module, enabled: bool) -> None:
    if enabled and not hasattr(model, "checkpoint_activations"):
        raise ConfigError(f"parallel.activation_checkpointing: model.arch builds a {type(model).__name__}, "
                          "which has no activation checkpointing; expected model.arch 'lm'")
    if enabled:
        model.checkpoint_activations = True
