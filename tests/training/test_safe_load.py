"""A planted malicious pickle in a run folder is refused everywhere a checkpoint is read (issue 19 item 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hybrid_pretrain.tests.fake_runs import fake_zero0_run
from hybrid_pretrain.tests.procs import run_script
from hybrid_pretrain.tests.training.test_checkpoint import FakeEngine
from hybrid_pretrain.training import checkpoint
from hybrid_pretrain.training.checkpoint import write_manifest
from hybrid_pretrain.training.safe_load import (
    FORCE_WEIGHTS_ONLY,
    UntrustedCheckpointError,
    load_pt,
    restricted_unpickling,
)
from hybrid_pretrain.training.weights import load_run


class Payload:
    """Unpickling this runs `touch <marker>`: what an attacker's object does in place of a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(run_dir: Path, marker: Path) -> Path:
    """Replace step 1's model states with the same weights plus a payload, and rewrite the manifest to match."""
    tag_dir = run_dir / "checkpoints" / "step00000001"
    victim = tag_dir / "mp_rank_00_model_states.pt"
    states = torch.load(victim, weights_only=True)
    torch.save({**states, "extra": Payload(marker)}, victim)
    write_manifest(tag_dir)  # whoever writes the folder writes the manifest: checksums still match
    return victim


def test_malicious_model_states_are_refused_and_run_nothing(tmp_path):
    fake_zero0_run(tmp_path / "run", "HA")
    marker = tmp_path / "pwned"
    victim = _plant(tmp_path / "run", marker)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint") as err:
        load_run(tmp_path / "run")
    assert str(victim) in str(err.value) and "system" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_cli_refusal_is_one_line_and_trust_checkpoint_opts_in(tmp_path):
    fake_zero0_run(tmp_path / "run", "HA")
    marker = tmp_path / "pwned"
    _plant(tmp_path / "run", marker)
    proc = run_script("convert_checkpoint", [str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--trust-checkpoint" in lines[0], proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    proc = run_script("convert_checkpoint", [str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                                             "--trust-checkpoint"])
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()  # the user vouched for the folder: its pickle ran, as the flag's help warns


def test_deepspeed_style_loads_are_forced_weights_only(tmp_path):
    """DeepSpeed's engine and zero_to_fp32 call torch.load(weights_only=False); inside the context they cannot."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": Payload(marker)}}, bad)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint"), restricted_unpickling(tmp_path):
        torch.load(bad, weights_only=False)
    assert not marker.exists() and FORCE_WEIGHTS_ONLY not in os.environ


def test_deepspeed_types_are_allowed_by_name(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "optim_states.pt"
    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "w": torch.ones(4)}
    torch.save(state, path)
    loaded = load_pt(path)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["param_slice_mappings"][0]["w"].numel == 4
    assert isinstance(loaded["loss_scaler"], LossScaler) and torch.equal(loaded["w"], torch.ones(4))


def test_resume_refuses_a_malicious_checkpoint(tmp_path):
    class DeepSpeedLikeEngine(FakeEngine):
        def load_checkpoint(self, load_dir, tag):
            state = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)
            return str(Path(load_dir) / tag), state["client"]

    engine = DeepSpeedLikeEngine()
    marker = tmp_path / "pwned"
    checkpoint.save(engine, tmp_path / "ckpt", 1, {"step": 1, "evil": Payload(marker)}, keep=2)
    with pytest.raises(UntrustedCheckpointError, match="step00000001.*--trust-checkpoint"):
        checkpoint.load(engine, tmp_path / "ckpt")
    assert not marker.exists()
    assert checkpoint.load(engine, tmp_path / "ckpt", trust=True)["step"] == 1 and marker.exists()
