"""Bitwise resume with dropout: a run stopped at step 2 and resumed repeats the uninterrupted run's steps 3-4.

Dropout draws its masks from torch's global generator, so this holds only if the resumed run restores the
saved RNG state after every setup draw: restored before the launcher counted parameters on the meta device
(which draws an init seed), the torch stream ran 2 words ahead and steps 3-4 got other masks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from hybrid_pretrain.tests.procs import DEBUG_CONFIG, SMALL_DATA, run_python
from hybrid_pretrain.training import weights

SHAPE = ["--config", DEBUG_CONFIG, *SMALL_DATA, "data.seq_len=32", "train.micro_batch_size=2", "train.steps=4",
         "train.save_every=2", "train.warmup_steps=0", "train.eval_every=0", "train.log_every=1",
         "model.d_model=64", "model.h3_d_state=8", "model.dropout=0.1"]


def _run(args: list[str]) -> str:
    proc = run_python(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _steps(run_dir: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r["grad_norm"]) for r in records]


def _rng_fields(run_dir: Path, tag: str) -> dict[str, object]:
    """Every saved generator field, flattened to names, as numpy arrays or plain numbers."""
    state = torch.load(run_dir / "checkpoints" / tag / "rng_rank00000.pt", weights_only=True)
    fields = {"torch": state["torch"].numpy()}
    for source in ("numpy", "python"):
        for key, value in state[source].items():
            fields[f"{source}.{key}"] = value.numpy() if torch.is_tensor(value) else value
    return fields


def test_dropout_run_resumed_at_step_2_repeats_losses_rng_and_weights(tmp_path) -> None:
    full = tmp_path / "full"
    _run([*SHAPE, f"run_dir={full}"])
    resumed = tmp_path / "resumed"  # the same run stopped after its step-2 checkpoint (data reused)
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step00000004"))
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    assert "resumed from step 2" in _run([*SHAPE, f"run_dir={resumed}", "--resume"])

    assert [s for s, _, _ in _steps(resumed)] == [1, 2, 3, 4]
    assert _steps(resumed) == _steps(full)  # losses and gradient norms, bit for bit
    want, got = _rng_fields(full, "step00000004"), _rng_fields(resumed, "step00000004")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert np.array_equal(got[name], value), f"step-4 RNG field {name} differs from the uninterrupted run's"
    reference, again = weights.load_run(full), weights.load_run(resumed)
    assert again.tag == reference.tag == "step00000004"
    for name, value in reference.state_dict.items():
        torch.testing.assert_close(again.state_dict[name], value, rtol=0, atol=0, msg=name)
