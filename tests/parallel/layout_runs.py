"""Shared by the 4-rank equivalence tests: launch a layout worker, compare tensors, check its checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from hybrid_pretrain.tests.procs import REPO, _free_port


def run_worker(worker: Path, layouts: tuple[str, ...], tmp: Path, ranks: int = 4) -> dict:
    """One deepspeed launch of `worker` over `layouts`; its rank-0 results plus ``ckpt`` (the checkpoints' root)."""
    out = tmp / "results.pt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parents[1] / "torch_extensions"))
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(_free_port()), str(worker),
           "--layouts", ",".join(layouts), "--ckpt", str(tmp / "ckpt"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {**torch.load(out, weights_only=False), "ckpt": tmp / "ckpt"}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against `b`."""
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def assert_resumes_and_consolidates(got: dict, ckpt: Path) -> dict[str, torch.Tensor]:
    """A fresh engine loading the step-2 checkpoint repeated step 3 bit for bit, every rank's files are under
    the manifest, and they reassemble into the weights saved; returns the consolidated state dict."""
    from hybrid_pretrain.training.checkpoint import latest_tag, verify
    from hybrid_pretrain.training.weights import consolidated_state_dict

    assert got["resumed_loss"] == got["losses"][-1]
    for name, w in got["weights"].items():
        assert torch.equal(got["resumed_weights"][name], w), name
    tag = latest_tag(ckpt)
    assert verify(ckpt / tag) is None
    merged = consolidated_state_dict(ckpt, tag)
    assert merged.keys() == got["saved_weights"].keys()
    for name, w in got["saved_weights"].items():
        assert torch.equal(merged[name], w), name
    return merged
