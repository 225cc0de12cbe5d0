"""Checkpoint publishing: manifest checksums, atomic ``latest``, pruning, fallback past a corrupt one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_pretrain.training import checkpoint


class FakeEngine:
    """Writes and reads files the way DeepSpeed's engine does: one folder per tag."""

    def __init__(self):
        self.loaded = None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"client": client_state, "w": torch.arange(1000.0)}, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag):
        self.loaded = tag
        state = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=True)
        return str(Path(load_dir) / tag), state["client"]


def _save_steps(ckpt_dir, steps, keep=3):
    engine = FakeEngine()
    for step in steps:
        checkpoint.save(engine, ckpt_dir, step, {"step": step}, keep)
    return engine


def test_save_publishes_with_manifest_and_prunes(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4])
    assert checkpoint.latest_tag(tmp_path) == "step00000004"
    assert checkpoint.complete_tags(tmp_path) == ["step00000002", "step00000003", "step00000004"]
    assert not list(tmp_path.glob(".tmp-*"))
    for tag in checkpoint.complete_tags(tmp_path):
        assert checkpoint.verify(tmp_path / tag) is None
        assert (tmp_path / tag / "rng_rank00000.pt").is_file()


def test_load_restores_client_state_and_rng(tmp_path):
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    engine = _save_steps(tmp_path, [5])
    expected = (torch.rand(4), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    state = checkpoint.load(engine, tmp_path)
    assert state["step"] == 5 and state["tag"] == "step00000005"
    got = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, capsys):
    engine = _save_steps(tmp_path, [1, 2])
    victim = tmp_path / "step00000002" / "mp_rank_00_model_states.pt"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        victim.unlink()
    state = checkpoint.load(engine, tmp_path)
    assert state["step"] == 1 and engine.loaded == "step00000001"
    assert "skipping corrupt checkpoint" in capsys.readouterr().err and "step00000002" in str(victim)


def test_unfinished_save_is_invisible(tmp_path):
    engine = _save_steps(tmp_path, [1])
    (tmp_path / ".tmp-step00000002").mkdir()  # a crash mid-save leaves only a temporary folder
    assert checkpoint.choose_tag(tmp_path) == "step00000001"
    assert checkpoint.load(engine, tmp_path)["step"] == 1


def test_no_usable_checkpoint_names_the_problem(tmp_path):
    _save_steps(tmp_path, [1])
    (tmp_path / "step00000001" / "rng_rank00000.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="rng_rank00000.pt is missing"):
        checkpoint.load(FakeEngine(), tmp_path)
