"""A checkpoint whose optimizer lived on NVMe consolidates to the same weights as one kept in host RAM.

DeepSpeed leaves such a checkpoint's fp32 master weights in its raw swap files (training.nvme_checkpoint);
the same run with the optimizer in host RAM steps with the same CPU Adam, so both must consolidate to
identical weights, name by name.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.tests.procs import DEBUG_CONFIG, SMALL_DATA, launch
from hybrid_pretrain.training import weights
from hybrid_pretrain.training.checkpoint import CheckpointError

SHAPE = ["--config", DEBUG_CONFIG, *SMALL_DATA, "data.seq_len=32", "train.micro_batch_size=2", "train.steps=2",
         "train.precision=bf16", "train.zero_stage=3", "train.warmup_steps=0", "train.eval_every=0"]


def _async_io_usable() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return bool(AsyncIOBuilder().is_compatible(verbose=False))


@pytest.mark.slow
def test_nvme_offloaded_checkpoint_consolidates_like_a_host_one(tmp_path) -> None:
    if not _async_io_usable():
        pytest.skip("DeepSpeed's async_io op needs libaio (apt-get install libaio-dev, or `make setup` as root)")
    runs = {}
    (tmp_path / "swap").mkdir()
    for where in ("cpu", "nvme"):
        run_dir = tmp_path / where
        extra = [f"train.offload.nvme_path={tmp_path / 'swap'}"] if where == "nvme" else []
        proc = launch([*SHAPE, f"run_dir={run_dir}", f"train.offload.optimizer={where}", *extra], ranks=1)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[where] = weights.load_run(run_dir)
    assert (tmp_path / "nvme" / "checkpoints" / runs["nvme"].tag / "offloaded_tensors").is_dir()
    host, nvme = runs["cpu"].state_dict, runs["nvme"].state_dict
    assert sorted(host) == sorted(nvme)
    for name in host:
        torch.testing.assert_close(nvme[name], host[name], rtol=0, atol=0, msg=name)
    # A swap file lost in a copy is named (by the checkpoint's manifest), not read as garbage.
    offloaded = tmp_path / "nvme" / "checkpoints" / runs["nvme"].tag / "offloaded_tensors"
    swap = next(p for p in offloaded.rglob("*.tensor.swp") if "exp_avg" not in p.name)  # the master weights
    swap.unlink()
    with pytest.raises(CheckpointError, match=swap.name):
        weights.load_run(tmp_path / "nvme")
