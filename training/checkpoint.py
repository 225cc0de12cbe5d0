"""Checkpoints through DeepSpeed's engine (sharded per ZeRO stage), written so that a crash never loses one.

A save goes to a temporary tag folder; when every rank has written its shards (and its RNG state),
the main rank records a sha256 manifest, renames the folder into place and only then moves the
``latest`` pointer (write-then-rename). Loading verifies the manifest and falls back to the newest
intact checkpoint, naming the corrupt one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hybrid_pretrain.base.hashing import file_sha256
from hybrid_pretrain.parallel.tensor import sharding_layout, tensor_parallel_size
from hybrid_pretrain.training.errors import CheckpointError  # callers import it from here
from hybrid_pretrain.training.safe_load import restricted_unpickling

TAG_PREFIX = "step"
TMP_PREFIX = ".tmp-"
MANIFEST = "MANIFEST.json"
LAYOUT = "parallel_layout.json"  # TP/PP runs: how to reassemble the single-rank weights (training.weights)


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag the ``latest`` pointer names (moved only after a save completed), or None."""
    pointer = ckpt_dir / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Finished checkpoint tags, oldest first."""
    return sorted(p.name for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and (p / MANIFEST).is_file())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every generator a step may draw from, as tensors and numbers only (loadable with weights_only=True)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    _write_atomic(folder / MANIFEST, json.dumps(entries, indent=1, sort_keys=True))


def verify(folder: Path) -> str | None:
    """None if every file in the manifest is present with its size and sha256, else what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        entries = json.loads(manifest.read_text())
    except ValueError:
        return f"{manifest} is not valid JSON"
    for name, expected in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        if file_sha256(path) != expected["sha256"]:
            return f"{path} fails its sha256 checksum"
    return None


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """Save on every rank (each writes its shards), publish atomically, keep the newest ``keep``."""
    tag, tmp_tag = tag_for(step), f"{TMP_PREFIX}{tag_for(step)}"
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a crash during an earlier save
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tmp_dir / f"rng_rank{_rank():05d}.pt")
    layout = parallel_layout(getattr(engine, "module", None))
    _barrier()
    if _rank() == 0:
        if layout is not None:
            _write_atomic(tmp_dir / LAYOUT, json.dumps(layout, indent=1, sort_keys=True))
        # Covers every rank's files: per tensor-rank model states, per-layer pipeline files, and under ZeRO-3
        # one model and one optimizer partition per (data, tensor) rank.
        write_manifest(tmp_dir)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        _write_atomic(ckpt_dir / "latest", tag)
        if keep:
            for old in complete_tags(ckpt_dir)[:-keep]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    _barrier()


def parallel_layout(module: Any) -> dict | None:
    """For a tensor- or pipeline-parallel module, the sizes and every sharded tensor's split (same on all
    ranks, gathered: a collective); None for a single-rank layout, which needs no reassembly."""

    rename = getattr(module, "lm_name", None)
    tp = tensor_parallel_size()
    if module is None or (tp == 1 and rename is None):
        return None
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, sharding_layout(module, rename))
    sharded: dict = {}
    for part in every:
        sharded.update(part)
    pp = module.num_stages if rename is not None else 1
    return {"tensor": tp, "pipeline": pp, "n_blocks": getattr(module, "n_blocks", 0), "sharded": sharded}


def choose_tag(ckpt_dir: Path) -> str:
    """The newest intact checkpoint, starting from ``latest``; warns about each corrupt one it skips."""
    candidates = complete_tags(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    if latest in candidates:
        candidates = candidates[: candidates.index(latest) + 1]
    problems = []
    for tag in reversed(candidates):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            for p in problems:
                print(f"warning: skipping corrupt checkpoint: {p}", file=sys.stderr, flush=True)
            return tag
        problems.append(problem)
    detail = "; ".join(problems) if problems else "no finished checkpoint"
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: {detail}")


def load(engine: Any, ckpt_dir: Path, trust: bool = False) -> dict:
    """Load the newest intact checkpoint into the engine and this rank's RNG; returns our client state.

    DeepSpeed's files are unpickled weights-only (training.safe_load) unless `trust` (--trust-checkpoint).
    """
    chosen: list = [None]
    if _rank() == 0:
        try:
            chosen[0] = choose_tag(ckpt_dir)
        except CheckpointError as e:
            chosen[0] = e
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    if isinstance(chosen[0], CheckpointError):
        raise CheckpointError(str(chosen[0]))
    tag = chosen[0]
    with restricted_unpickling(ckpt_dir / tag, trust):
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    client_state["tag"] = tag
    return client_state
