"""End to end: `deepspeed launcher/pretrain.py` on real processes over gloo, resume, and bad input.

These are the slow tests CI keeps: each starts real ranks through the DeepSpeed launcher.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_pretrain.tests.procs import REPO, SMALL_DATA, launch, run_python

DEBUG = str(REPO / "configs" / "debug_hybrid.yaml")
SMALL = SMALL_DATA


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_ok(proc):
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail}"


@pytest.mark.slow
def test_two_rank_run_trains_logs_checkpoints_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", DEBUG, f"run_dir={run_dir}", *SMALL, "train.save_every=3", "train.eval_every=3",
              "train.eval_batches=2", "train.warmup_steps=2"]
    first = launch([*common, "train.steps=6"])
    _assert_ok(first)
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] is not None for r in records)
    assert "val_loss" in records[2] and "val_loss" in records[5]
    assert records[-1]["tokens"] == 6 * 2 * 8 * 128  # steps x ranks x micro-batch x seq_len
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000006"
    for artifact in ("config.yaml", "loss.png", "throughput.png", "summary.json", "data/tokenizer.model"):
        assert (run_dir / artifact).exists(), artifact
    assert list((run_dir / "tensorboard").iterdir())

    # Without --resume the run refuses to overwrite its checkpoints: one clear line, exit 2.
    again = launch([*common, "train.steps=6"])
    assert again.returncode != 0
    assert "already holds checkpoints; pass --resume" in again.stderr + again.stdout

    resumed = launch([*common, "train.steps=9", "--resume"])
    _assert_ok(resumed)
    assert "resumed from step 6" in resumed.stdout
    steps = [r["step"] for r in _metrics(run_dir)]
    assert steps == list(range(1, 10))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == 6 and summary["final_step"] == 9


@pytest.mark.slow
def test_debug_config_loss_drops_thirty_percent(tmp_path):
    """The main job's promise: mean loss of the last 10 steps at least 30% below the first step's."""
    run_dir = tmp_path / "main"
    proc = launch(["--config", DEBUG, f"run_dir={run_dir}", "train.save_every=0", "train.eval_every=0"])
    _assert_ok(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 150
    assert summary["last10_mean_loss"] <= 0.7 * summary["first_loss"], summary


@pytest.mark.slow
def test_missing_corpus_is_one_clear_line_on_two_ranks(tmp_path):
    proc = launch(["--config", DEBUG, f"run_dir={tmp_path / 'r'}", "--data", str(tmp_path / "nothing*.jsonl.zst")])
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert "nothing*.jsonl.zst" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_empty_corpus_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_python(["--config", DEBUG, f"run_dir={tmp_path / 'r'}", "--data", str(empty)])
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train.stpes=3"], "did you mean 'train.steps'"),
        (["model.layers=HHZ"], "unknown symbol 'Z'"),
        (["parallel.tensor=2"], "does not divide the world size 1"),
    (["parallel.tensor=3"], "model.n_heads (4) must be divisible by parallel.tensor (3)"),
    ],
)
def test_bad_input_exits_with_one_line(tmp_path, args, expected):
    proc = run_python(["--config", DEBUG, f"run_dir={tmp_path / 'r'}", *args])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr


def test_dry_run_prints_params_and_memory_without_allocating():
    proc = run_python(["--config", str(REPO / "configs" / "h3_hybrid_2.7b.yaml"), "--dry-run", "--world-size", "8"])
    assert proc.returncode == 0, proc.stderr
    assert "parameters:" in proc.stdout and "per-rank memory estimate (8 ranks" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("parameters:"))
    n = int(line.split()[1].replace(",", ""))
    assert abs(n - 2.7e9) / 2.7e9 < 0.03


def test_help_works():
    proc = run_python(["--help"])
    assert proc.returncode == 0 and "--resume" in proc.stdout and "--dry-run" in proc.stdout


@pytest.mark.slow
def test_zero_stages_agree_and_report_grad_norm(tmp_path):
    """Single rank: ZeRO 0 and 3 take the same steps as ZeRO 1, and every stage logs a gradient norm."""
    runs = {}
    for stage in (0, 1, 3):
        run_dir = tmp_path / f"z{stage}"
        proc = run_python(["--config", DEBUG, f"run_dir={run_dir}", *SMALL, "train.steps=3",
                           f"train.zero_stage={stage}", "train.grad_accum=2", "train.eval_every=0"])
        _assert_ok(proc)
        runs[stage] = _metrics(run_dir)
    for stage in (0, 3):
        for a, b in zip(runs[stage], runs[1]):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_trains_on_pg19_folder_and_pile_shards(tmp_path, shared_data):
    """The development corpora (skipped when ../shared/data is absent): a PG-19 folder and Pile shards."""
    pg19, pile = shared_data / "pg19_sample", shared_data / "pile_sample" / "train" / "*.jsonl.zst"
    for name, path in (("pg19", pg19), ("pile", pile)):
        run_dir = tmp_path / name
        proc = run_python(["--config", DEBUG, f"run_dir={run_dir}", "--data", str(path), *SMALL,
                           "train.steps=3", "train.eval_every=3"])
        _assert_ok(proc)
        records = _metrics(run_dir)
        assert len(records) == 3 and "val_loss" in records[-1]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_reproduces_losses_exactly(tmp_path):
    """Kill all ranks with SIGKILL mid-run, resume: per-step losses equal the uninterrupted run's bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from hybrid_pretrain.tests.procs import _free_port

    common = ["--config", DEBUG, *SMALL, "train.steps=12", "train.save_every=2", "train.eval_every=4",
              "train.eval_batches=1", "train.warmup_steps=3"]
    reference = tmp_path / "reference"
    _assert_ok(launch([*common, f"run_dir={reference}"]))

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "launcher" / "pretrain.py"), *common, f"run_dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for rank in range(2):  # killed ranks cannot unlink DeepSpeed's shared-memory buffers (groups.destroy does)
        Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}").unlink(missing_ok=True)
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 12

    resumed = launch([*common, f"run_dir={killed}", "--resume"])
    _assert_ok(resumed)
    got, want = _metrics(killed), _metrics(reference)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in want]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", DEBUG, f"run_dir={run_dir}", *SMALL, "train.save_every=2", "train.eval_every=0"]
    _assert_ok(run_python([*common, "train.steps=4"]))
    shard = next((run_dir / "checkpoints" / "step00000004").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    proc = run_python([*common, "train.steps=6", "--resume"])
    _assert_ok(proc)
    assert "skipping corrupt checkpoint" in proc.stderr and "step00000004" in proc.stderr
    assert "resumed from step 2" in proc.stdout
