"""ZeRO-3 with the optimizer on NVMe: its checkpoint consolidates like a host-RAM one and resumes bit for bit.

DeepSpeed leaves such a checkpoint's fp32 master weights and Adam states in copies of its raw swap files
(training.nvme_checkpoint). The same run with the optimizer in host RAM steps with the same CPU Adam, so
both must consolidate to identical weights, name by name. A resumed run must repeat the uninterrupted run's
steps exactly: deepspeed 0.19.8's load alone lost Adam's state and the small in-RAM sub-groups (step 3 loss
6.5146 vs 6.5210, step 4 6.7795 vs 6.0427); training.nvme_resume restores them.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from hybrid_pretrain.launcher.preflight import async_io_problem
from hybrid_pretrain.tests.procs import DEBUG_CONFIG, SMALL_DATA, launch
from hybrid_pretrain.training import weights
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.nvme_resume import check_saved_ranks

SHAPE = ["--config", DEBUG_CONFIG, *SMALL_DATA, "data.seq_len=32", "train.micro_batch_size=2", "train.steps=4",
         "train.save_every=2", "train.keep_checkpoints=2", "train.precision=bf16", "train.zero_stage=3",
         "train.warmup_steps=0", "train.eval_every=0", "train.log_every=1"]


def _run(args: list[str]) -> str:
    proc = launch(args, ranks=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _steps(run_dir) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r["grad_norm"]) for r in records]


@pytest.mark.slow
def test_nvme_offloaded_checkpoint_consolidates_like_a_host_one_and_resumes_exactly(tmp_path) -> None:
    if async_io_problem():  # the launcher's own check: libaio missing
        pytest.skip("DeepSpeed's async_io op needs libaio (apt-get install libaio-dev, or `make setup` as root)")
    (tmp_path / "swap").mkdir()
    nvme = [f"train.offload.nvme_path={tmp_path / 'swap'}", "train.offload.optimizer=nvme"]
    _run([*SHAPE, f"run_dir={tmp_path / 'cpu'}", "train.offload.optimizer=cpu"])
    full = tmp_path / "nvme"
    _run([*SHAPE, f"run_dir={full}", *nvme])
    host, on_nvme = weights.load_run(tmp_path / "cpu"), weights.load_run(full)
    assert on_nvme.tag == "step00000004"
    assert (full / "checkpoints" / on_nvme.tag / "offloaded_tensors").is_dir()
    assert sorted(host.state_dict) == sorted(on_nvme.state_dict)
    for name, value in host.state_dict.items():
        torch.testing.assert_close(on_nvme.state_dict[name], value, rtol=0, atol=0, msg=name)

    # The same run stopped after its step-2 checkpoint, resumed to step 4 with the swap folder as step 4 left
    # it (stale). The step-2 files are hard links: a resumed run only reads them.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step0*"))
    shutil.copytree(full / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002",
                    copy_function=os.link)
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    assert "resumed from step 2" in _run([*SHAPE, f"run_dir={resumed}", *nvme, "--resume"])
    assert [s for s, _, _ in _steps(resumed)] == [1, 2, 3, 4]
    assert _steps(resumed) == _steps(full)  # losses and gradient norms, bit for bit
    again = weights.load_run(resumed)
    assert again.tag == "step00000004"
    for name, value in on_nvme.state_dict.items():
        torch.testing.assert_close(again.state_dict[name], value, rtol=0, atol=0, msg=name)

    # A swap file lost in a copy is named (by the checkpoint's manifest), not read as garbage.
    offloaded = full / "checkpoints" / on_nvme.tag / "offloaded_tensors"
    swap = next(p for p in offloaded.rglob("*.tensor.swp") if "exp_avg" not in p.name)  # the master weights
    swap.unlink()
    with pytest.raises(CheckpointError, match=swap.name):
        weights.load_run(full, tag=on_nvme.tag)


def test_resuming_at_another_number_of_ranks_is_refused_in_one_line(tmp_path) -> None:
    for rank in range(2):
        (tmp_path / "offloaded_tensors" / f"rank{rank:02d}").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="swap files of 2 ranks, this run has 1"):
        check_saved_ranks(tmp_path)
