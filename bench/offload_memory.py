"""Offload memory plan vs measurement: ``python bench/offload_memory.py --shapes 355m-cpu,355m-nvme``.

Each shape is a real one-rank ``deepspeed launcher/pretrain.py`` run (ZeRO-3, bf16, a few steps of
micro-batch 1) with ``train.offload`` set; the run logs its peak RSS (``peak_mem_mib`` in
metrics.jsonl) and this script prints it beside the ``--dry-run`` estimate. On a CPU-only machine the
"device" and the host are one memory, so the estimate of the RSS is the device total plus the bytes
offloaded to host RAM plus the runtime (training.memory.cpu_rss); NVMe bytes are not counted (they
are files), and are printed beside the size of the swap folder after the run.

Shapes: ``355m-cpu`` / ``355m-nvme`` (h3_hybrid_355m, 358M parameters, the slow test's shape),
``1.4b-nvme-opt`` (the 2.7B offload run's layout at half its depth) and ``2.7b-nvme`` (h3_hybrid_2.7b
with optimizer and parameters on NVMe: ~20 GiB RAM and ~38 GB of swap files; see bench/RESULTS.md
before running it on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hybrid_pretrain.launcher.preflight import per_rank_plan
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.memory import CPU_RUNTIME, cpu_rss, format_bytes

REPO = Path(__file__).resolve().parents[1]
COMMON = ["data.max_corpus_bytes=1500000", "data.vocab_size=1024", "data.tokenizer_sample_bytes=1500000",
          "data.seq_len=32", "train.micro_batch_size=1", "train.precision=bf16", "train.zero_stage=3",
          "train.warmup_steps=0", "train.eval_every=0", "train.log_every=1", "train.save_every=0"]
SHAPES = {
    "355m-cpu": ("configs/h3_hybrid_355m.yaml", ["train.offload.optimizer=cpu"]),
    "355m-nvme": ("configs/h3_hybrid_355m.yaml", ["train.offload.optimizer=nvme", "train.offload.params=nvme"]),
    "2.7b-nvme": ("configs/h3_hybrid_2.7b.yaml", ["train.offload.optimizer=nvme", "train.offload.params=nvme"]),
    # the 2.7B run's layout (optimizer on NVMe, bf16 weights in host RAM) and width at 16 of its 32 layers: 1.39B
    # parameters, ~13 GiB RSS, 21 GB of swap files and a 16 GB checkpoint, ~5 min
    "1.4b-nvme-opt": ("configs/h3_hybrid_2.7b.yaml", ["train.offload.optimizer=nvme", "train.offload.params=cpu",
                                                      "model.layers=HHHHHHHAHHHHHHHA"]),
}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(shape: str, steps: int, work: Path) -> dict:
    """Run one shape; its peak RSS, swap-folder size, wall time and losses beside the plan."""
    config, offload = SHAPES[shape]
    run_dir, swap = work / shape, work / f"{shape}-swap"
    swap.mkdir(parents=True, exist_ok=True)
    overrides = [*COMMON, *offload, f"train.steps={steps}", f"run_dir={run_dir}", f"train.offload.nvme_path={swap}"]
    plan = per_rank_plan(load_config(str(REPO / config), overrides), 1)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", str(REPO / "launcher" / "pretrain.py"),
           "--config", str(REPO / config), "--overwrite", *overrides]
    # DeepSpeed's ops as `make setup` built them (cpu_adam, async_io), not a fresh JIT build elsewhere.
    env = {"TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"), **os.environ}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{shape}: the run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"shape": shape, "plan": plan, "rss": max(r["peak_mem_mib"] for r in records) * 2**20,
            "swap": folder_bytes(swap), "seconds": seconds, "losses": [r["train_loss"] for r in records],
            "step_s": [r.get("step_time_s") for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="355m-cpu", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--work", help="folder for runs and swap files (default: a temporary one, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (checkpoints included)")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; expected some of {', '.join(SHAPES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="offload_memory_"))
    print(f"peak RSS (one rank, CPU) vs the --dry-run plan: device total + offloaded to host + runtime "
          f"{format_bytes(CPU_RUNTIME)}; NVMe apart")
    print(f"{'shape':<10}{'device':>11}{'host':>11}{'estimate':>11}{'measured':>11}{'ratio':>7}"
          f"{'nvme plan':>11}{'swap files':>11}{'wall s':>8}  losses")
    try:
        for shape in shapes:
            r = measure(shape, args.steps, work)
            plan = r["plan"]
            estimate = cpu_rss(plan)
            losses = " ".join(f"{x:.2f}" for x in r["losses"])
            print(f"{shape:<10}{format_bytes(plan['total']):>11}{format_bytes(plan['offloaded_host']):>11}"
                  f"{format_bytes(estimate):>11}{format_bytes(r['rss']):>11}{r['rss'] / estimate:>7.2f}"
                  f"{format_bytes(plan['offloaded_nvme']):>11}{format_bytes(r['swap']):>11}{r['seconds']:>8.0f}  "
                  f"{losses}", flush=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
