"""Checkpoints that fail safe (issue 19 item 5): bad manifests are corrupt, crashes leave nothing ignored,
a failed save stops every rank with one error, and the directory is fsynced after publishing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.hashing import file_sha256
from hybrid_pretrain.launcher.pretrain import prepare_run_dir
from hybrid_pretrain.tests.procs import REPO, _free_port
from hybrid_pretrain.tests.training.test_checkpoint import FakeEngine, _save_steps
from hybrid_pretrain.training import checkpoint
from hybrid_pretrain.training.checkpoint import MANIFEST, CheckpointError
from hybrid_pretrain.training.config import load_config

WORKER = REPO / "tests" / "training" / "save_failure_worker.py"
STATES = "mp_rank_00_model_states.pt"


def _rewrite_manifest(folder: Path, change) -> None:  # noqa: ANN001
    entries = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(change(entries)))


def _outside_file(tmp_path: Path) -> Path:
    victim = tmp_path / "elsewhere.bin"
    victim.write_bytes(b"not a checkpoint")
    return victim


BAD_MANIFESTS = {
    "a list": lambda e, out: list(e),
    "empty": lambda e, out: {},
    "entry not a mapping": lambda e, out: {**e, STATES: 5},
    "size as text": lambda e, out: {**e, STATES: {**e[STATES], "bytes": str(e[STATES]["bytes"])}},
    "size a bool": lambda e, out: {**e, "rng_rank00000.pt": {**e["rng_rank00000.pt"], "bytes": True}},
    "sha256 not hex": lambda e, out: {**e, STATES: {**e[STATES], "sha256": "z" * 64}},
    "extra key": lambda e, out: {**e, STATES: {**e[STATES], "mode": "0777"}},
    # an absolute path outside the folder with its true size and checksum: accepted before, never read now
    "absolute path": lambda e, out: {**e, str(out): {"bytes": out.stat().st_size, "sha256": file_sha256(out)}},
    "parent path": lambda e, out: {**e, f"../{out.name}": {"bytes": out.stat().st_size, "sha256": file_sha256(out)}},
    "file left out": lambda e, out: {k: v for k, v in e.items() if k != "rng_rank00000.pt"},
}


@pytest.mark.parametrize("bad", sorted(BAD_MANIFESTS))
def test_a_malformed_manifest_is_corrupt_and_loading_falls_back(tmp_path, bad, capsys):
    ckpt = tmp_path / "ckpt"
    engine = _save_steps(ckpt, [1, 2])
    out = _outside_file(tmp_path)
    _rewrite_manifest(ckpt / "step00000002", lambda e: BAD_MANIFESTS[bad](e, out))
    assert checkpoint.verify(ckpt / "step00000002") is not None
    assert checkpoint.load(engine, ckpt)["step"] == 1 and engine.loaded == "step00000001"
    assert "skipping corrupt checkpoint" in capsys.readouterr().err


def test_a_symlink_out_of_the_folder_is_corrupt(tmp_path):
    ckpt = tmp_path / "ckpt"
    _save_steps(ckpt, [1])
    out = _outside_file(tmp_path)
    link = ckpt / "step00000001" / "extra.bin"
    link.symlink_to(out)
    _rewrite_manifest(ckpt / "step00000001", lambda e: {**e, "extra.bin": {"bytes": out.stat().st_size,
                                                                           "sha256": file_sha256(out)}})
    assert "outside its checkpoint folder" in checkpoint.verify(ckpt / "step00000001")


def test_a_complete_checkpoint_newer_than_latest_is_adopted(tmp_path, capsys):
    engine = _save_steps(tmp_path, [1, 2])
    (tmp_path / "latest").write_text("step00000001")  # the crash came after the rename, before the pointer
    assert checkpoint.choose_tag(tmp_path) == "step00000002"
    assert "adopting" in capsys.readouterr().err
    assert checkpoint.load(engine, tmp_path)["step"] == 2
    assert checkpoint.latest_tag(tmp_path) == "step00000002"  # the pointer is repaired on resume


def test_a_corrupt_newer_checkpoint_is_removed_on_resume_not_rotated_in(tmp_path, capsys):
    engine = _save_steps(tmp_path, [1, 2])
    (tmp_path / "latest").write_text("step00000001")
    (tmp_path / "step00000002" / STATES).write_bytes(b"half a file")
    assert checkpoint.load(engine, tmp_path)["step"] == 1
    assert "removing corrupt checkpoint" in capsys.readouterr().err
    assert checkpoint.complete_tags(tmp_path) == ["step00000001"]
    checkpoint.save(engine, tmp_path, 2, {"step": 2}, keep=2)
    assert checkpoint.complete_tags(tmp_path) == ["step00000001", "step00000002"]


def test_first_save_crash_still_counts_as_checkpoints(tmp_path):
    """A crash before the first `latest` existed leaves a published checkpoint: the run dir is not fresh."""
    run_dir = tmp_path / "run"
    _save_steps(run_dir / "checkpoints", [1])
    (run_dir / "checkpoints" / "latest").unlink()
    cfg = load_config(None, [f"run_dir={run_dir}"])
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        prepare_run_dir(cfg, resume=False, overwrite=False)
    assert checkpoint.load(FakeEngine(), run_dir / "checkpoints")["step"] == 1


def test_leftovers_of_crashed_saves_are_removed_and_garbage_pointers_ignored(tmp_path):
    engine = _save_steps(tmp_path, [1])
    (tmp_path / ".tmp-step00000009").mkdir()
    (tmp_path / ".tmp-latest").write_text("step00000009")
    checkpoint.save(engine, tmp_path, 2, {"step": 2}, keep=3)
    assert not list(tmp_path.glob(".tmp-*"))
    (tmp_path / "latest").write_text("../../etc")
    assert checkpoint.latest_tag(tmp_path) is None and checkpoint.choose_tag(tmp_path) == "step00000002"


def test_the_directory_is_fsynced_after_publishing(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    _save_steps(tmp_path, [1])
    published = synced.index(str(tmp_path / "latest").replace("latest", ".tmp-latest"))
    assert str(tmp_path) in synced[:published]  # the rename of the tag folder is durable before the pointer moves
    assert str(tmp_path) in synced[published + 1:]  # and so is the pointer
    assert any(p.endswith(STATES) for p in synced)  # the data itself, before the rename


def _two_ranks(engine: str, tmp_path: Path) -> list[str]:
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    args = [sys.executable, str(WORKER), "--engine", engine, "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path)]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]  # a hang would end here, not at a 30-min PG timeout
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), logs
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


@pytest.mark.parametrize("engine", ["fake", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_disk_full_on_one_rank_stops_every_rank_with_the_same_error(tmp_path, engine):
    results = _two_ranks(engine, tmp_path)
    assert results[0] == results[1], results
    assert results[0].startswith("saving checkpoint step00000007") and "failed on rank 1" in results[0]
    assert "No space left on device" in results[0] and "\n" not in results[0]
    assert not (tmp_path / "ckpt" / "step00000007").exists() and not list((tmp_path / "ckpt").glob(".tmp-*"))
    assert checkpoint.latest_tag(tmp_path / "ckpt") is None


def test_a_save_error_is_the_same_one_line_error_on_a_single_rank(tmp_path, monkeypatch):
    engine = _save_steps(tmp_path, [1])

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_manifest", full)
    with pytest.raises(CheckpointError, match="saving checkpoint step00000002 .* failed on rank 0: .*No space left"):
        checkpoint.save(engine, tmp_path, 2, {"step": 2}, keep=3)
    assert checkpoint.latest_tag(tmp_path) == "step00000001" and checkpoint.complete_tags(tmp_path) == ["step00000001"]
