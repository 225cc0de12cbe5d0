"""Expert parallelism on real ranks over gloo: EP=2 equals EP=1, and checkpoints move between EP sizes.

Both sides run 2 data-parallel ranks on the same per-rank batches, so routing groups and capacities
are identical and only the placement of experts differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_pretrain.tests.procs import REPO, _free_port

WORKER = REPO / "tests" / "parallel" / "moe_ep_worker.py"


def _run(ranks: int, *args: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(_free_port()), str(WORKER), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _train(tmp_path: Path, ep: int, top_k: int) -> dict:
    out = tmp_path / f"train_ep{ep}.pt"
    _run(2, "--mode", "train", "--ep", str(ep), "--top-k", str(top_k), "--ckpt", str(tmp_path / f"ckpt{ep}"),
         "--out", str(out))
    return torch.load(out, weights_only=False)


def _assert_equivalent(ep2: dict, ep1: dict) -> None:
    # Every global expert's gradient, the router's and the dense layers', after the engine's reduction.
    assert sorted(ep2["grads"]) == sorted(ep1["grads"])
    assert sum(".expert" in k for k in ep2["grads"]) == 2 * 4 * 4  # 2 MoE layers x 4 experts x 4 tensors
    for name, grad in ep1["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ep2["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for zero in (0, 1):
        torch.testing.assert_close(torch.tensor(ep2[f"losses_zero{zero}"]), torch.tensor(ep1[f"losses_zero{zero}"]),
                                   rtol=1e-5, atol=1e-6)
    # ZeRO-1 clips by the global norm: experts on other ranks count.
    torch.testing.assert_close(torch.tensor(ep2["norms_zero1"]), torch.tensor(ep1["norms_zero1"]), rtol=1e-5, atol=0)
    assert ep2["metrics_zero1"].keys() == ep1["metrics_zero1"].keys()


@pytest.mark.slow
def test_switch_ep2_equals_ep1_losses_and_gradients(tmp_path):
    _assert_equivalent(_train(tmp_path, 2, top_k=1), _train(tmp_path, 1, top_k=1))


@pytest.mark.slow
def test_glam_ep2_equals_ep1_and_its_checkpoint_loads_at_ep1_with_same_logits(tmp_path):
    saved = _train(tmp_path, 2, top_k=2)
    _assert_equivalent(saved, _train(tmp_path, 1, top_k=2))
    files = {p.name for p in (tmp_path / "ckpt2" / "step00000004").iterdir()}
    assert {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(4)} <= files
    out = tmp_path / "load_ep1.pt"
    _run(1, "--mode", "load", "--ep", "1", "--top-k", "2", "--ckpt", str(tmp_path / "ckpt2"), "--out", str(out))
    loaded = torch.load(out, weights_only=False)
    torch.testing.assert_close(loaded["logits"], saved["logits"], rtol=1e-5, atol=1e-5)
