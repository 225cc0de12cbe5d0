"""ZeRO-3 with the optimizer on NVMe: its checkpoint consolidates like a host-RAM one; --resume is refused.

DeepSpeed leaves such a checkpoint's fp32 master weights and Adam states in copies of its raw swap files
(training.nvme_checkpoint). The same run with the optimizer in host RAM steps with the same CPU Adam, so
both must consolidate to identical weights, name by name. Resuming it is refused with one line: with
deepspeed 0.19.8 the resumed steps differed from the uninterrupted run's (measured with this test's runs).
"""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.launcher.preflight import async_io_problem
from hybrid_pretrain.tests.procs import DEBUG_CONFIG, SMALL_DATA, launch
from hybrid_pretrain.training import weights
from hybrid_pretrain.training.checkpoint import CheckpointError

SHAPE = ["--config", DEBUG_CONFIG, *SMALL_DATA, "data.seq_len=32", "train.micro_batch_size=2", "train.steps=4",
         "train.save_every=2", "train.keep_checkpoints=2", "train.precision=bf16", "train.zero_stage=3",
         "train.warmup_steps=0", "train.eval_every=0", "train.log_every=1"]


def _run(args: list[str]) -> None:
    proc = launch(args, ranks=1)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_nvme_offloaded_checkpoint_consolidates_like_a_host_one_and_refuses_resume(tmp_path) -> None:
    if async_io_problem():  # the launcher's own check: libaio missing
        pytest.skip("DeepSpeed's async_io op needs libaio (apt-get install libaio-dev, or `make setup` as root)")
    (tmp_path / "swap").mkdir()
    nvme = [f"train.offload.nvme_path={tmp_path / 'swap'}", "train.offload.optimizer=nvme"]
    _run([*SHAPE, f"run_dir={tmp_path / 'cpu'}", "train.offload.optimizer=cpu"])
    _run([*SHAPE, f"run_dir={tmp_path / 'nvme'}", *nvme])
    host, on_nvme = weights.load_run(tmp_path / "cpu"), weights.load_run(tmp_path / "nvme")
    assert on_nvme.tag == "step00000004"
    assert (tmp_path / "nvme" / "checkpoints" / on_nvme.tag / "offloaded_tensors").is_dir()
    assert sorted(host.state_dict) == sorted(on_nvme.state_dict)
    for name, value in host.state_dict.items():
        torch.testing.assert_close(on_nvme.state_dict[name], value, rtol=0, atol=0, msg=name)

    # Resuming is refused before anything runs, and the checkpoints stay as they were.
    full = tmp_path / "nvme"
    proc = launch([*SHAPE, f"run_dir={full}", *nvme, "--resume"], ranks=1)
    assert proc.returncode == 2 and "does not restore an NVMe-offloaded optimizer exactly" in proc.stderr
    assert weights.load_run(full).tag == "step00000004"

    # A swap file lost in a copy is named (by the checkpoint's manifest), not read as garbage.
    offloaded = full / "checkpoints" / on_nvme.tag / "offloaded_tensors"
    swap = next(p for p in offloaded.rglob("*.tensor.swp") if "exp_avg" not in p.name)  # the master weights
    swap.unlink()
    with pytest.raises(CheckpointError, match=swap.name):
        weights.load_run(full, tag=on_nvme.tag)
