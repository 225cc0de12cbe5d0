"""Multi-node launch path on one host: `deepspeed --hostfile H --launcher mpich` starts 2 ranks through mpirun.

The same run also checks what issue 5 asks every run to log: model FLOP/s, MFU (empty on CPU) and
every rank's peak memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_pretrain.tests.procs import DEBUG_CONFIG, REPO, TINY_RUN, _free_port


@pytest.mark.slow
def test_mpich_hostfile_launch_trains_two_ranks_and_logs_flops_and_memory(tmp_path):
    bin_dir = Path(sys.executable).parent
    if shutil.which("mpirun", path=str(bin_dir)) is None:
        pytest.skip(f"no mpirun in {bin_dir}; install the PyPI 'mpich' wheel")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one host, two ranks\nlocalhost slots=2\n")
    run_dir = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    preflight = subprocess.run([sys.executable, str(REPO / "launcher" / "preflight.py"), "--hostfile", str(hostfile),
                                "--launcher", "mpich", "--master-addr", "127.0.0.1", "--master-port", str(port),
                                "--config", DEBUG_CONFIG,
                                *TINY_RUN], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert preflight.returncode == 0, preflight.stdout + preflight.stderr
    assert "1 host(s), 2 ranks" in preflight.stdout

    cmd = [str(bin_dir / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "mpich", "--force_multi",
           "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(REPO / "launcher" / "pretrain.py"), "--config", DEBUG_CONFIG, f"run_dir={run_dir}", *TINY_RUN,
           "train.steps=3"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    finally:  # DeepSpeed's CPU shared-memory all-reduce leaves its 69 MB-per-rank buffers in /dev/shm
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            path.unlink(missing_ok=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "mpirun" in out  # launched through MPI, not the local launcher
    assert "ranks: 2 (DP=2)" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["model_tflops"] > 0
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
        assert len(r["peak_mem_mib_per_rank"]) == 2 and min(r["peak_mem_mib_per_rank"]) > 0
        assert r["peak_mem_mib"] == max(r["peak_mem_mib_per_rank"])
