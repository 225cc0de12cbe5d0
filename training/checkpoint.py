"""Checkpoints through DeepSpeed's engine (sharded per ZeRO stage), written so that a crash never loses one.

A save goes to a temporary tag folder; when every rank has written its shards (and its RNG state),
the main rank records a sha256 manifest, fsyncs, renames the folder into place, moves the ``latest``
pointer (write-then-rename) and fsyncs the directory. A write that fails on any rank (disk full) makes
every rank stop with the same one-line error instead of leaving the others at a barrier.

Loading verifies the manifest (its structure too, and that every path stays inside the folder) and
falls back to the newest intact checkpoint, naming the corrupt one. A complete checkpoint newer than
``latest`` (a crash between the rename and the pointer update) is adopted when intact; a corrupt one
newer than what a resume starts from is removed, with a warning, so it never takes a rotation slot.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
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
from hybrid_pretrain.training.nvme_resume import check_saved_ranks, restore_nvme_optimizer
from hybrid_pretrain.training.safe_load import restricted_unpickling

TAG_PREFIX = "step"
TMP_PREFIX = ".tmp-"
MANIFEST = "MANIFEST.json"
LAYOUT = "parallel_layout.json"  # TP/PP runs: how to reassemble the single-rank weights (training.weights)
_TAG = re.compile(rf"^{TAG_PREFIX}\d{{8}}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def is_tag(name: str) -> bool:
    """Whether `name` is a checkpoint tag (``step`` and 8 digits): nothing else is ever joined to a folder."""
    return bool(_TAG.match(name))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag the ``latest`` pointer names (moved only after a save completed), or None (also for garbage)."""
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text(errors="replace").strip()
    return tag if is_tag(tag) else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Finished checkpoint tags (published with a manifest), oldest first."""
    return sorted(p.name for p in ckpt_dir.glob(f"{TAG_PREFIX}*")
                  if is_tag(p.name) and p.is_dir() and (p / MANIFEST).is_file())


def has_checkpoints(ckpt_dir: Path) -> bool:
    """Whether a run directory's checkpoint folder holds any checkpoint, pointed at or not."""
    return latest_tag(ckpt_dir) is not None or bool(complete_tags(ckpt_dir))


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


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it, a replaced pointer) durable, not only the files' data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Record every file's size and sha256 (each fsynced on the way: the data is durable before the rename)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {}
    for p in files:
        with p.open("rb") as f:
            os.fsync(f.fileno())
        entries[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    _write_atomic(folder / MANIFEST, json.dumps(entries, indent=1, sort_keys=True))


def _manifest_problem(folder: Path, entries: object) -> str | None:
    """What is wrong with a parsed manifest's shape or paths (None if nothing): it must map relative paths
    inside `folder` to {"bytes": int >= 0, "sha256": 64 hex digits}, and list every file the folder holds."""
    manifest = folder / MANIFEST
    if not isinstance(entries, dict) or not entries:
        return f"{manifest} is not a non-empty mapping of file -> {{bytes, sha256}}"
    root = folder.resolve()
    for name, expected in entries.items():
        if not isinstance(expected, dict) or set(expected) != {"bytes", "sha256"}:
            return f"{manifest} entry {name!r:.80} is not {{bytes, sha256}}"
        size, digest = expected["bytes"], expected["sha256"]
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not _SHA256.match(digest):
            return f"{manifest} entry {name!r:.80} has a malformed size or sha256"
        path = Path(name)
        if not name or path.is_absolute() or ".." in path.parts or root not in (root / path).resolve().parents:
            return f"{manifest} names {name!r:.80}, outside its checkpoint folder"
    unlisted = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                and str(p.relative_to(folder)) not in entries]
    if unlisted:
        return f"{unlisted[0]} is not in {manifest}"
    return None


def verify(folder: Path) -> str | None:
    """None if the manifest is well formed and every file it lists is present with its size and sha256,
    else what is wrong (a bad manifest makes the checkpoint corrupt, so loading falls back)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        entries = json.loads(manifest.read_text())
    except (ValueError, RecursionError, UnicodeDecodeError):
        return f"{manifest} is not valid JSON"
    problem = _manifest_problem(folder, entries)
    if problem:
        return problem
    for name, expected in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        if file_sha256(path) != expected["sha256"]:
            return f"{path} fails its sha256 checksum"
    return None


class _RecordedWrites:
    """DeepSpeed's checkpoint engine with a failed write recorded instead of raised in the middle of a save.

    DeepSpeed runs collectives between and after its writes; a rank that raised out of the save would
    leave the others waiting at the next one until the process-group timeout. Recorded, the save runs
    to its end on every rank and `_agree` then stops them all with the same error.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.error: str | None = None

    def save(self, state_dict: Any, path: str) -> None:
        if self.error is not None:
            return
        try:
            self.inner.save(state_dict, path)
        except OSError as e:
            self.error = _describe(e, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _describe(error: OSError, path: object) -> str:
    return f"writing {path}: {error.strerror or error}" + (" (disk full)" if error.errno == errno.ENOSPC else "")


def _agree(error: str | None, what: str) -> None:
    """A collective: every rank passes its own error (or None); if any rank failed, all raise the same line."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if failed:
        rank, first = failed[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {first}")


def _remove_leftovers(ckpt_dir: Path) -> None:
    """Temporary folders and pointers of saves that crashed (never published, so nobody reads them)."""
    for path in ckpt_dir.glob(f"{TMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """Save on every rank (each writes its shards), publish atomically, keep the newest ``keep``.

    Raises the same CheckpointError on every rank when a write fails on any of them (the partial folder
    is removed; the previous checkpoint stays the newest); call it on every rank.
    """
    tag, tmp_tag = tag_for(step), f"{TMP_PREFIX}{tag_for(step)}"
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    what = f"saving checkpoint {tag} in {ckpt_dir}"
    if _rank() == 0:
        _remove_leftovers(ckpt_dir)
    _barrier()
    inner = getattr(engine, "checkpoint_engine", None)  # DeepSpeed's: every file of its save goes through it
    writes = _RecordedWrites(inner) if inner is not None else None
    if writes is not None:
        engine.checkpoint_engine = writes
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    finally:
        if writes is not None:
            engine.checkpoint_engine = writes.inner
    error = writes.error if writes is not None else None
    if error is None:  # the RNG state the next step starts from: nothing draws between here and that step
        rng_file = tmp_dir / f"rng_rank{_rank():05d}.pt"
        try:
            torch.save(rng_state(), rng_file)
        except OSError as e:
            error = _describe(e, rng_file)
    layout = parallel_layout(getattr(engine, "module", None))
    try:
        _agree(error, what)
    except CheckpointError:
        if _rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # free what the failed save took
        raise
    error = None
    if _rank() == 0:
        try:
            _publish(ckpt_dir, tmp_dir, final_dir, layout, keep)
        except OSError as e:
            error = _describe(e, e.filename or ckpt_dir)
            shutil.rmtree(tmp_dir, ignore_errors=True)
    _agree(error, what)


def _publish(ckpt_dir: Path, tmp_dir: Path, final_dir: Path, layout: dict | None, keep: int) -> None:
    """Main rank: manifest, rename into place, move ``latest``, fsync the directory, rotate."""
    if layout is not None:
        _write_atomic(tmp_dir / LAYOUT, json.dumps(layout, indent=1, sort_keys=True))
    # Covers every rank's files: per tensor-rank model states, per-layer pipeline files, and under ZeRO-3
    # one model and one optimizer partition per (data, tensor) rank.
    write_manifest(tmp_dir)
    if final_dir.exists():  # the same step saved again (a resumed run): the new save replaces it
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(ckpt_dir)
    _write_atomic(ckpt_dir / "latest", final_dir.name)
    fsync_dir(ckpt_dir)
    if keep:
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


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
    """The newest intact checkpoint; warns about each corrupt one it skips.

    Every published checkpoint counts, also one newer than ``latest``: the folder is renamed into place
    only once every rank's files and the manifest are written, so a crash before the pointer moved
    leaves a complete checkpoint, which is adopted (with a warning) rather than ignored.
    """
    latest = latest_tag(ckpt_dir)
    problems = []
    for tag in reversed(complete_tags(ckpt_dir)):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            for p in problems:
                print(f"warning: skipping corrupt checkpoint: {p}", file=sys.stderr, flush=True)
            if latest is not None and tag > latest:
                print(f"warning: adopting {ckpt_dir / tag}: complete and intact, but 'latest' still names {latest} "
                      "(a crash between publishing it and moving the pointer)", file=sys.stderr, flush=True)
            return tag
        problems.append(problem)
    detail = "; ".join(problems) if problems else "no finished checkpoint"
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: {detail}")


def _resume_from(ckpt_dir: Path) -> str:
    """Main rank, before a resume: the tag to load, with ``latest`` moved to it and every published
    checkpoint newer than it (corrupt ones: choose_tag skipped them) removed with a warning, so the
    resumed run never counts them for rotation or falls back into them later."""
    tag = choose_tag(ckpt_dir)
    for newer in [t for t in complete_tags(ckpt_dir) if t > tag]:
        print(f"warning: removing corrupt checkpoint {ckpt_dir / newer} (newer than {tag}, which the run resumes "
              "from)", file=sys.stderr, flush=True)
        shutil.rmtree(ckpt_dir / newer, ignore_errors=True)
    if latest_tag(ckpt_dir) != tag:
        _write_atomic(ckpt_dir / "latest", tag)
        fsync_dir(ckpt_dir)
    return tag


def _optimizer_on_nvme(engine: Any) -> bool:
    check = getattr(engine, "zero_nvme_offload_optimizer", None)  # a DeepSpeedEngine (tests pass simpler engines)
    return bool(check and check())


def load(engine: Any, ckpt_dir: Path, trust: bool = False) -> dict:
    """Load the newest intact checkpoint into the engine and this rank's RNG; returns our client state.

    Call it last before the first step: the RNG state it restores is the one the saved run's next step
    started from, and any draw after it (building or counting a model) would shift every later dropout mask.

    DeepSpeed's files are unpickled weights-only (training.safe_load) unless `trust` (--trust-checkpoint).
    """
    chosen: list = [None]
    if _rank() == 0:
        try:
            chosen[0] = _resume_from(ckpt_dir)
        except (CheckpointError, OSError) as e:
            chosen[0] = CheckpointError(str(e))
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    if isinstance(chosen[0], CheckpointError):
        raise CheckpointError(str(chosen[0]))
    tag = chosen[0]
    on_nvme = _optimizer_on_nvme(engine)
    if on_nvme:
        check_saved_ranks(ckpt_dir / tag)
    with restricted_unpickling(ckpt_dir / tag, trust):
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is not None and on_nvme:  # what DeepSpeed's load skips there (training.nvme_resume)
            restore_nvme_optimizer(engine, str(ckpt_dir), tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    client_state["tag"] = tag
    return client_state
