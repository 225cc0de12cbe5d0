"""Consolidate a ZeRO-3 checkpoint whose optimizer lived on NVMe (``train.offload.optimizer: nvme``).

DeepSpeed saves such a run's fp32 master weights as the raw swap files it trained from, copied to
``<tag>/offloaded_tensors/rankXX/<first>_<last>.tensor.swp``: one file per swapped optimizer sub-group,
holding that rank's fp32 partition of the sub-group's parameters back to back, named by the DeepSpeed
ids (``ds_id``, the order of ``module.parameters()``) of its first and last parameter. Sub-groups too
small to swap stay in ``*_optim_states.pt``'s ``fp32_flat_groups``, whose swapped entries are empty.
DeepSpeed's ``zero_to_fp32`` reads only the latter (it stops with "consumed N numels out of 0"), hence
this reader.

The names and shapes of each sub-group come from the checkpoint's own ``param_shapes``; the ids from
the run's model built on the meta device (no memory). Each parameter is partitioned over the ranks as
ZeRO-3 does: ``ceil(numel / world)`` elements per rank, the last rank padded.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hybrid_pretrain.training.errors import CheckpointError

OFFLOADED = "offloaded_tensors"


def is_nvme_checkpoint(tag_dir: Path) -> bool:
    return (tag_dir / OFFLOADED).is_dir()


def nvme_state_dict(tag_dir: Path, model_states: list[dict], flat_groups: list[list[torch.Tensor]],
                    parameter_order: list[str]) -> dict[str, torch.Tensor]:
    """Full fp32 weights; `model_states` the ranks' ``zero_pp_rank_*_model_states.pt`` and `flat_groups` their
    ``*_optim_states.pt``'s ``fp32_flat_groups``, rank by rank.

    `parameter_order` is ``[name for name, _ in model.named_parameters()]`` of the run's model, whose
    positions are DeepSpeed's parameter ids.
    """
    world = int(model_states[0].get("dp_world_size", 1))
    rank_dirs = sorted((tag_dir / OFFLOADED).glob("rank*"))
    if len(rank_dirs) != world or len(flat_groups) != world:
        raise CheckpointError(f"{tag_dir} holds {len(rank_dirs)} swap folders and {len(flat_groups)} optimizer "
                              f"files; the checkpoint was written by {world} data-parallel ranks")
    ids = {name: i for i, name in enumerate(parameter_order)}
    out: dict[str, torch.Tensor] = {}
    for group, shapes in enumerate(model_states[0]["param_shapes"]):  # one OrderedDict per optimizer sub-group
        missing = [n for n in shapes if n not in ids]
        if missing:
            raise CheckpointError(f"{tag_dir}: parameter {missing[0]} of optimizer sub-group {group} is not in the "
                                  "run's model; expected the checkpoint of this run's config")
        first, last = ids[next(iter(shapes))], ids[next(reversed(shapes))]
        numels = [math.prod(shape) for shape in shapes.values()]
        parts = [math.ceil(n / world) for n in numels]  # each parameter's partition on every rank
        flats = [groups[group].numpy() if groups[group].numel() else  # kept in RAM: saved in the .pt file
                 _read_swap(rank_dir / f"{first}_{last}.tensor.swp", sum(parts))
                 for rank_dir, groups in zip(rank_dirs, flat_groups, strict=True)]
        offset = 0
        for (name, shape), numel, part in zip(shapes.items(), numels, parts, strict=True):
            pieces = [flat[offset : offset + part] for flat in flats]
            out[name] = torch.from_numpy(np.concatenate(pieces)[:numel].copy()).view(tuple(shape))
            offset += part
    return out


def _read_swap(path: Path, numel: int) -> np.ndarray:
    """The first `numel` fp32 values of a swap file (DeepSpeed may pad the file to its I/O block size)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; expected DeepSpeed's NVMe swap file for this optimizer sub-group "
                              "(copy the whole checkpoint folder, offloaded_tensors included)")
    if path.stat().st_size < 4 * numel:
        raise CheckpointError(f"{path} holds {path.stat().st_size} bytes; expected at least {4 * numel} "
                              f"({numel} fp32 values)")
    return np.memmap(path, dtype=np.float32, mode="r", shape=(numel,))
