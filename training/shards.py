"""Join the per-tensor-rank copies of a checkpoint's weights into the single-rank state dict.

Both consolidation paths (dense tensor/pipeline runs in ``training.weights`` and MoE runs in
``training.expert_checkpoint``) collect, for every single-rank name, the tensor each tensor rank saved;
``parallel_layout.json`` says which are shards and how to join them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hybrid_pretrain.parallel.tensor import merge_shards
from hybrid_pretrain.training.checkpoint import CheckpointError


def join_tensor_ranks(pieces: dict[str, dict[int, torch.Tensor]], sharded: dict[str, list], tp: int,
                      tag_dir: Path) -> dict[str, torch.Tensor]:
    """name -> {tensor rank: tensor} to name -> the single-rank fp32 tensor (replicated ones from the lowest rank)."""

    out = {}
    for name, by_rank in pieces.items():
        if name in sharded:
            if sorted(by_rank) != list(range(tp)):
                raise CheckpointError(f"{tag_dir}: '{name}' has tensor ranks {sorted(by_rank)}, expected 0..{tp - 1}")
            value = merge_shards([by_rank[r] for r in range(tp)], *sharded[name])
        else:
            value = by_rank[min(by_rank)]
        out[name] = value.float() if value.is_floating_point() else value
    return out
