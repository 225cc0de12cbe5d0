"""bf16 vs fp32 training of ``configs/debug_hybrid.yaml``, side by side: ``python bench/bf16_curve.py``.

Runs ``launcher/pretrain.py`` twice on one CPU rank, identical but for ``train.precision`` (same seed,
data and batches): fp32, then ``--precision``: DeepSpeed bf16 (bf16 weights and activations, fp32 master
weights and Adam states) or bf16_autocast (fp32 weights and optimizer, bf16 matmuls under torch.autocast).
Prints both loss curves at a few steps, the relative gap of the mean of the last 10 training losses and
of the final validation loss (the issue's bound: 2% after 150 steps), and each run's median time per step.
On a shared machine the two runs meet different loads, so the speed ratio comes from ``--timing-steps``
steps of both engines interleaved in one process (fp32, bf16, fp32, ...): the median of the per-pair ratios.
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

REPO = Path(__file__).resolve().parents[1]


def train(precision: str, steps: int, run_dir: Path, threads: int, extra: list[str]) -> list[dict]:
    """One pretrain run; returns its metrics.jsonl records."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    config = REPO / "configs" / "debug_hybrid.yaml"
    cmd = [sys.executable, str(REPO / "launcher" / "pretrain.py"), "--config", str(config), "--overwrite",
           f"run_dir={run_dir}", f"train.precision={precision}", f"train.steps={steps}",
           f"train.eval_every={steps}", f"train.save_every={steps}", *extra]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compare(fp32: list[dict], bf16: list[dict]) -> dict:
    """Loss gaps (relative to fp32) and the median step times of two runs' metrics."""

    def last10(records: list[dict]) -> float:
        return statistics.fmean(r["train_loss"] for r in records[-10:])

    def val(records: list[dict]) -> float:
        return [r["val_loss"] for r in records if "val_loss" in r][-1]

    def step_s(records: list[dict]) -> float:
        return statistics.median(r["tokens"] / r["step"] / r["tokens_per_s"] for r in records)

    return {
        "last10_fp32": last10(fp32), "last10_bf16": last10(bf16),
        "last10_gap": abs(last10(bf16) - last10(fp32)) / last10(fp32),
        "val_fp32": val(fp32), "val_bf16": val(bf16), "val_gap": abs(val(bf16) - val(fp32)) / val(fp32),
        "max_step_gap": max(abs(b["train_loss"] - f["train_loss"]) / f["train_loss"] for f, b in zip(fp32, bf16)),
        "step_s_fp32": step_s(fp32), "step_s_bf16": step_s(bf16),
    }


def interleaved_ratio(steps: int, threads: int, other: str = "bf16") -> tuple[float, float, float]:
    """(median fp32 step s, median `other` step s, median per-pair other / fp32) from alternating steps in one
    process."""
    import time

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # JIT ops built once
    import torch

    from hybrid_pretrain.models.lm import LanguageModel
    from hybrid_pretrain.parallel import engine as ds_engine
    from hybrid_pretrain.parallel import groups
    from hybrid_pretrain.training.config import load_config
    from hybrid_pretrain.training.optimizer import param_groups

    torch.set_num_threads(threads)
    cfg = load_config(str(REPO / "configs" / "debug_hybrid.yaml"))
    cfg.model.vocab_size = cfg.data.vocab_size
    ctx = groups.initialize(cfg.parallel)
    engines = {}
    for precision in ("fp32", other):
        torch.manual_seed(cfg.seed)
        model = LanguageModel(cfg.model)
        t = cfg.train
        t.precision = precision
        engines[precision] = ds_engine.initialize(model, param_groups(model, t.lr, t.weight_decay),
                                                  ds_engine.deepspeed_config(t, ctx.dp_size), lambda step: 1.0)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len))
    times: dict[str, list[float]] = {"fp32": [], other: []}
    for step in range(steps + 2):  # two warm-up steps each
        for precision, engine in engines.items():
            start = time.perf_counter()
            engine.backward(engine(ids, labels=ids))
            engine.step()
            if step >= 2:
                times[precision].append(time.perf_counter() - start)
    groups.destroy()
    ratios = [b / f for f, b in zip(times["fp32"], times[other])]
    return statistics.median(times["fp32"]), statistics.median(times[other]), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--timing-steps", type=int, default=20, help="interleaved steps for the speed ratio")
    parser.add_argument("--precision", choices=("bf16", "bf16_autocast"), default="bf16",
                        help="the train.precision compared with fp32")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for both runs, e.g. data.vocab_size=1024")
    args = parser.parse_args()
    bf16 = args.precision  # printed as "bf16" below, whichever bf16 mode it is
    print(f"compared with fp32: train.precision={bf16}")
    if args.steps == 0:  # the timing alone
        fp32_s, bf16_s, ratio = interleaved_ratio(args.timing_steps, args.threads, bf16)
        print(f"fp32 {fp32_s * 1e3:.0f} ms, bf16 {bf16_s * 1e3:.0f} ms per step; bf16 / fp32 {ratio:.2f}x")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        runs = {p: train(p, args.steps, root / p, args.threads, args.overrides) for p in ("fp32", bf16)}
    result = compare(runs["fp32"], runs[bf16])
    shown = sorted({1, 10, 25, 50, 100, args.steps} & {r["step"] for r in runs["fp32"]})
    print(f"debug_hybrid, 1 CPU rank, {args.threads} threads, {args.steps} steps")
    print(f"{'step':>6} {'fp32 loss':>10} {'bf16 loss':>10} {'gap':>7}")
    for f, b in zip(runs["fp32"], runs[bf16]):
        if f["step"] in shown:
            gap = (b["train_loss"] - f["train_loss"]) / f["train_loss"]
            print(f"{f['step']:>6} {f['train_loss']:>10.4f} {b['train_loss']:>10.4f} {gap:>+7.2%}")
    print(f"mean of last 10 train losses: fp32 {result['last10_fp32']:.4f}, bf16 {result['last10_bf16']:.4f} "
          f"(gap {result['last10_gap']:.2%})")
    print(f"final val loss: fp32 {result['val_fp32']:.4f}, bf16 {result['val_bf16']:.4f} (gap {result['val_gap']:.2%})")
    print(f"largest single-step gap: {result['max_step_gap']:.2%}")
    print(f"time per step (median): fp32 {result['step_s_fp32'] * 1e3:.0f} ms, "
          f"bf16 {result['step_s_bf16'] * 1e3:.0f} ms "
          f"(bf16 / fp32 {result['step_s_bf16'] / result['step_s_fp32']:.2f}x, separate runs)")
    fp32_s, bf16_s, ratio = interleaved_ratio(args.timing_steps, args.threads, bf16)
    print(f"interleaved in one process, {args.timing_steps} steps each: fp32 {fp32_s * 1e3:.0f} ms, "
          f"bf16 {bf16_s * 1e3:.0f} ms per step (bf16 / fp32 {ratio:.2f}x, median of per-pair ratios)")


if __name__ == "__main__":
    main()
