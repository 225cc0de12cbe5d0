"""Checkpoints through DeepSpeed's engine (sharded per ZeRO stage), with our loop state as client state."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file names (written after a save completes), or None."""
    pointer = ckpt_dir / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """Save on every rank (each writes its shards), then prune all but the newest ``keep`` tags."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag_for(step), client_state=client_state)
    if keep and dist.get_rank() == 0:
        tags = sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(engine: Any, ckpt_dir: Path) -> dict | None:
    """Load the latest checkpoint into the engine; returns our client state, or None if there is none."""
    if latest_tag(ckpt_dir) is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        return None
    return client_state
