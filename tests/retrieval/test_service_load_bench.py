"""bench/service_load.py end to end, small: the real service in its own process, rebuilt while clients search."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hybrid_pretrain.tests.procs import REPO


@pytest.mark.slow
def test_load_benchmark_runs_with_zero_failed_queries():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "service_load.py"), "--clients", "2", "--requests",
                           "60", "--n", "1000", "--dim", "32", "--rebuild-every", "0.2"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed queries 0 (goal 0)" in proc.stdout
    assert "service / in-process" in proc.stdout
