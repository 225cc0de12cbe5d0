"""Start a run from a consolidated checkpoint's weights, at whatever layout the new run has.

``launcher/pretrain.py --init-from CKPT`` builds this rank's model as usual (its expert slice, tensor
slice or pipeline stage), then copies the consolidated weights in before the DeepSpeed engine exists,
so the engine partitions them for its own ZeRO stage and saves sharded checkpoints at the new layout.
Optimizer, schedule and data position start fresh (step 0).

Names: the consolidated checkpoint uses the single-rank ``LanguageModel`` names. On a rank, an
expert-parallel MoE layer keeps experts ``ep_rank * E/EP ...`` under DeepSpeed's container names
(``experts.deepspeed_moe.experts.deepspeed_experts.<local>``; see parallel/expert.py), a pipeline
stage names its layers by position (``PipelineModule.lm_name`` maps them back), and a tensor-parallel
parameter holds its slice (``parallel.tensor.shard`` cuts it).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.parallel.tensor import shard
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.weights import (
    MODEL_CONFIG_FILE,
    TOKENIZER_FILE,
    RunWeights,
    load_consolidated,
    model_config_from_dict,
)

# Fields that change how a model trains but not which tensors it has or what they mean.
TRAINING_ONLY_FIELDS = frozenset({"dropout", "init_std", "moe_dropless", "capacity_factor", "eval_capacity_factor",
                                  "min_capacity", "aux_loss_coef", "z_loss_coef", "jitter"})
LOCAL_EXPERT = re.compile(r"^(.*)\.experts\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.*)$")
GLOBAL_EXPERT = re.compile(r"^(.*)\.experts\.mlps\.(\d+)\.(.*)$")


def check_model_config(checkpoint: ModelConfig, run: ModelConfig, source: str) -> None:
    """Raise ConfigError naming the first model field (other than training-only ones) that differs."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in TRAINING_ONLY_FIELDS:
            continue
        theirs, ours = getattr(checkpoint, f.name), getattr(run, f.name)
        if theirs != ours:
            raise ConfigError(f"--init-from {source}: model.{f.name} is {theirs!r} in the checkpoint but {ours!r} in "
                              f"this run; expected the same model shape (set model.{f.name}={theirs})")


def _expert_rank(container: nn.Module) -> int:
    """This rank's index in the expert-parallel group of a DeepSpeed MoE container."""
    if getattr(container, "ep_size", 1) == 1:
        return 0

    return dist.get_rank(container.group)


def consolidated_name(model: nn.Module) -> Callable[[str], str]:
    """Map a name in ``model.state_dict()`` to the single-rank LanguageModel name it was cut from."""
    to_lm = getattr(model, "lm_name", lambda name: name)  # a pipeline stage's positional names

    def rename(name: str) -> str:
        m = LOCAL_EXPERT.match(name)
        if m:
            container = model.get_submodule(f"{m.group(1)}.experts")
            first = _expert_rank(container) * container.num_local_experts
            name = f"{m.group(1)}.experts.mlps.{first + int(m.group(2))}.{m.group(3)}"
        return to_lm(name)

    return rename


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy the consolidated `state_dict` into this rank's `model` (its slice of it), strictly.

    Every model tensor must be found with the right shape, and (for a whole model, not a pipeline
    stage) every checkpoint tensor must land somewhere except other ranks' experts; the first
    offending tensor is named in a CheckpointError.
    """

    rename = consolidated_name(model)
    used: set[str] = set()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():  # params keep their TP attributes
            if not torch.is_tensor(tensor):  # megatron-core's `_extra_state` (Transformer Engine metadata): no weights
                continue
            key = rename(name)
            if key not in state_dict:
                raise CheckpointError(f"--init-from {source}: the checkpoint has no tensor '{key}' (model tensor "
                                      f"'{name}'); expected a checkpoint of the same model.arch and layers")
            value = shard(state_dict[key], tensor)
            if value.shape != tensor.shape:
                raise CheckpointError(f"--init-from {source}: tensor '{key}' has shape {tuple(state_dict[key].shape)} "
                                      f"in the checkpoint, this rank expects {tuple(tensor.shape)}")
            tensor.copy_(value)
            used.add(key)
    if hasattr(model, "lm_name"):
        return  # a pipeline stage holds some layers only; the config check vouches for the rest
    local_experts = {m.group(1) for m in map(LOCAL_EXPERT.match, model.state_dict()) if m}
    unused = [k for k in state_dict if k not in used and not _other_ranks_expert(k, local_experts)]
    if unused:
        raise CheckpointError(f"--init-from {source}: checkpoint tensor '{unused[0]}' has no place in this model "
                              f"({len(unused)} unused); expected a checkpoint of the same model.arch and layers")


def _other_ranks_expert(key: str, expert_parallel_layers: set[str]) -> bool:
    m = GLOBAL_EXPERT.match(key)
    return bool(m) and m.group(1) in expert_parallel_layers


def adopt_tokenizer(data_tokenizer: str, ckpt_dir: str | Path) -> str:
    """The tokenizer the new run should use: its own if set, else the checkpoint's (same token ids)."""
    path = Path(ckpt_dir) / TOKENIZER_FILE
    if data_tokenizer:
        return data_tokenizer
    if not path.is_file():
        raise ConfigError(f"--init-from {ckpt_dir} has no {TOKENIZER_FILE}; set data.tokenizer=<the tokenizer the "
                          "checkpoint was trained with>")
    return str(path)


def init_from(model: nn.Module, ckpt_dir: str | Path, run_model: ModelConfig) -> RunWeights:
    """Check `run_model` against the checkpoint's model config, then load its weights into `model`."""
    weights = load_consolidated(ckpt_dir)
    check_model_config(weights.config.model, run_model, str(ckpt_dir))
    load_into(model, weights.state_dict, str(ckpt_dir))
    return weights


def prepare_config(cfg, ckpt_dir: str | Path) -> None:
    """Point the run at the checkpoint's tokenizer and vocabulary size where the run leaves them open (0 / unset),
    and refuse a run whose model shape differs from the checkpoint's (ConfigError naming the field).

    Reads config.json only (no tensors), so every rank can call it before data preparation.
    """

    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"--init-from {ckpt_dir}: {path} is missing; expected a folder written by "
                              "convert_checkpoint.py")
    try:
        checkpoint = model_config_from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"--init-from {ckpt_dir}: {path} is not valid JSON: {e}") from None
    if not cfg.data.indexed:  # preprocessed shards carry their own tokenizer; the vocabulary is checked at load
        cfg.data.tokenizer = adopt_tokenizer(cfg.data.tokenizer, ckpt_dir)
    # Fail before any data work: every shape field now, the vocabulary too unless the data decides it later.
    run = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or checkpoint.vocab_size)
    check_model_config(checkpoint, run, str(ckpt_dir))
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = checkpoint.vocab_size
