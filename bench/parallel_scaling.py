"""Parallel scaling, side by side in one run: ``python bench/parallel_scaling.py``.

Trains the same config with ``deepspeed launcher/pretrain.py`` three ways: one rank, two ranks of
data parallelism (DP=2, twice the global batch) and two ranks of tensor parallelism (TP=2, the same
batch split by heads/channels), and reads tokens/s from each run's ``metrics.jsonl``, skipping
warm-up steps. Prints DP=2 / DP=1 and TP=2 / TP=1 as ratios (ideal: 2.0x for both), plus achieved
model TFLOP/s per rank and peak memory per rank. The configurations alternate over ``--rounds`` so
load on a shared machine hits them alike; a run counts its median step, a setup its fastest run.

Each rank gets ``--threads`` torch threads (default 1), so two ranks use twice the cores of one and
the ratio measures the parallel implementation, not the BLAS library's own threading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
SETUPS = {  # name: (ranks, overrides)
    "1 rank": (1, []),
    "DP=2": (2, []),
    "TP=2": (2, ["parallel.tensor=2"]),
    # Opt-in (--setups): the two pipeline schedules on the same stages, DeepSpeed's PipelineEngine (ZeRO-1)
    # against parallel/one_f_one_b.py (ZeRO-2), 4 micro-batches per step.
    "PP=2 Z1": (2, ["parallel.pipeline=2", "train.zero_stage=1", "train.grad_accum=4"]),
    "PP=2 Z2": (2, ["parallel.pipeline=2", "train.zero_stage=2", "train.grad_accum=4"]),
}
DEFAULT_SETUPS = ("1 rank", "DP=2", "TP=2")


def launch(ranks: int, overrides: list[str], run_dir: Path, threads: int, port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
           str(REPO / "launcher" / "pretrain.py"), *overrides, f"run_dir={run_dir}", "--overwrite"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce never unlinks its /dev/shm buffers (69 MB per rank); drop this run's."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        path.unlink(missing_ok=True)


def timed_steps(run_dir: Path, warmup: int) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] > warmup]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "debug_hybrid.yaml"))
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=3, help="times each setup runs, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (OMP_NUM_THREADS)")
    parser.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                        help=f"comma-separated subset of: {', '.join(SETUPS)}")
    parser.add_argument("--port", type=int, default=29731, help="rendezvous port of the runs")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. data.seq_len=256")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.setups.split(",")]
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        parser.error(f"--setups: unknown {unknown}; expected names from {list(SETUPS)}")
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")

    common = ["--config", args.config, f"train.steps={args.steps}", "train.eval_every=0", "train.save_every=0",
              "train.log_every=1", *args.overrides]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}  # per run: medians over its timed steps
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="parallel_scaling_") as tmp:
        data_dir = Path(tmp) / "shared"  # prepare the corpus and tokenizer once, reuse in every run
        jobs = [(r, n) for r in range(args.rounds) for n in names]
        for i, (round_, name) in enumerate(tqdm(jobs, desc="runs", unit="run")):
            if name in failed:
                continue
            ranks, extra = SETUPS[name]
            run_dir = Path(tmp) / f"{name.replace(' ', '_').replace('=', '')}_{round_}"
            if data_dir.exists():
                run_dir.mkdir(parents=True)
                (run_dir / "data").symlink_to(data_dir)
            proc = launch(ranks, [*common, *extra], run_dir, args.threads, args.port + i)
            remove_shm_buffers(args.port + i)
            if proc.returncode:
                lines = (proc.stdout + proc.stderr).splitlines()
                first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
                detail = [lines[first], *(line for line in lines[first + 1:] if line.startswith("  - "))] \
                    if first is not None else [f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"]
                failed[name] = " ".join(detail)
                continue
            if not data_dir.exists():
                (run_dir / "data").rename(data_dir)
            timed = timed_steps(run_dir, args.warmup)
            runs[name].append({key: statistics.median(r[key] for r in timed)
                               for key in ("tokens_per_s", "model_tflops", "peak_mem_mib")})

    def best(name: str) -> dict[str, float]:
        """The least disturbed run: on a shared machine, others' load only ever slows a run down."""
        return max(runs[name], key=lambda r: r["tokens_per_s"])

    print(f"config {Path(args.config).name} {' '.join(args.overrides)}; {args.steps} steps per run, first "
          f"{args.warmup} skipped, {args.rounds} rounds; {args.threads} thread(s) per rank; "
          "each run's median step, best run per setup")
    print(f"{'setup':<8} {'ranks':>5} {'tokens/s':>10} {'TFLOP/s/rank':>13} {'peak MiB/rank':>14}")
    for name in names:
        if name in failed:
            print(f"{name:<8} failed: {failed[name]}")
            continue
        b = best(name)
        every = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs[name])
        print(f"{name:<8} {SETUPS[name][0]:>5} {b['tokens_per_s']:>10.0f} {b['model_tflops']:>13.4f} "
              f"{b['peak_mem_mib']:>14.0f}   (runs: {every})")
    base = "1 rank" if "1 rank" in names and "1 rank" not in failed else None
    for name, label in (("DP=2", "DP=2 / DP=1"), ("TP=2", "TP=2 / TP=1")):
        if base and name in names and name not in failed:
            ratio = best(name)["tokens_per_s"] / best(base)["tokens_per_s"]
            print(f"{label}: {ratio:.2f}x tokens/s (ideal 2.00x, efficiency {ratio / 2:.0%})")
    if {"PP=2 Z1", "PP=2 Z2"} <= set(names) - set(failed):
        ratio = best("PP=2 Z2")["tokens_per_s"] / best("PP=2 Z1")["tokens_per_s"]
        print(f"PP=2 ZeRO-2 (our 1F1B) / ZeRO-1 (DeepSpeed's pipeline engine): {ratio:.2f}x tokens/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
