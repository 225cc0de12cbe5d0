"""Training on synthetic tasks: the CLI contract, and that H3 learns induction heads (the paper's claim, reduced)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hybrid_pretrain.synthetic.train import SyntheticRun, train_synthetic
from hybrid_pretrain.tests.procs import REPO


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launcher" / "synthetic.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_final_accuracy_last_and_names_bad_flags() -> None:
    proc = _cli(["--task", "associative_recall", "--layers", "SA", "--vocab", "8", "--seq-len", "10", "--width", "16",
                 "--d-state", "8", "--train-size", "64", "--test-size", "32", "--epochs", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final test accuracy: ") and 0.0 <= float(last.split(": ")[1]) <= 1.0
    proc = _cli(["--task", "associative_recall", "--seq-len", "41"])
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "--seq-len" in proc.stderr
    proc = _cli(["--task", "induction_head", "--layers", "HZ"])
    assert proc.returncode == 2 and "unknown symbol 'Z'" in proc.stderr
    assert _cli(["--help"]).returncode == 0


@pytest.mark.slow
def test_h3_learns_induction_head() -> None:
    """Reduced from the paper's setting (fewer, shorter sequences, narrower model) to stay well under 2 minutes."""
    run = SyntheticRun(task="induction_head", layers="HH", vocab=10, seq_len=20, train_size=2000, test_size=300,
                       epochs=15, d_model=32, d_state=32, lr=2e-3, warmup_epochs=1, embed_dropout=0.0)
    _, acc = train_synthetic(run, eval_every=1, progress=False, stop_at=0.95, log=lambda _: None)
    assert acc >= 0.9, run.history
