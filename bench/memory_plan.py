"""The --dry-run memory plan against a measured training step, debug shape on CPU: ``python bench/memory_plan.py``.

Each case runs in a fresh process on one rank: start torch.distributed, then measure how far resident
memory peaks above that point (``training.memory_probe.peak_rss_growth``, glibc's mmap threshold at 64 KiB
so that RSS follows live tensors) while the process builds ``configs/debug_hybrid.yaml``'s model, wraps it
in the DeepSpeed engine exactly as ``launcher/pretrain.py`` does and trains two steps (the second one runs
with Adam's states allocated). Printed beside ``training.memory.estimate_memory``'s per-rank total for the
same run (weights, fp32 master copies, gradients, Adam states, activations) and the ratio.

Library start-up that any run pays (imports, the gloo group, oneDNN and FFT plan caches: measured once
by a warm-up step on a throw-away copy of the model) is outside both numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name: config overrides
    "fp32 ZeRO-0": ["train.precision=fp32", "train.zero_stage=0"],
    "fp32 ZeRO-1": ["train.precision=fp32", "train.zero_stage=1"],
    "bf16 ZeRO-1": ["train.precision=bf16", "train.zero_stage=1"],
    "bf16_autocast ZeRO-1": ["train.precision=bf16_autocast", "train.zero_stage=1"],
    "bf16 ZeRO-3": ["train.precision=bf16", "train.zero_stage=3"],
    "bf16_autocast ZeRO-3": ["train.precision=bf16_autocast", "train.zero_stage=3"],
    "fp32 ZeRO-1 checkpointed": ["train.precision=fp32", "train.zero_stage=1",
                                 "parallel.activation_checkpointing=true"],
}


def measure(overrides: list[str]) -> dict:
    import torch

    from hybrid_pretrain.models.lm import LanguageModel
    from hybrid_pretrain.parallel import engine as ds_engine
    from hybrid_pretrain.parallel import groups
    from hybrid_pretrain.parallel.build import build_model
    from hybrid_pretrain.training.config import load_config
    from hybrid_pretrain.training.flops import full_parameter_count
    from hybrid_pretrain.training.memory import estimate_memory
    from hybrid_pretrain.training.memory_probe import peak_rss_growth
    from hybrid_pretrain.training.optimizer import param_groups

    torch.set_num_threads(1)
    cfg = load_config(str(REPO / "configs" / "debug_hybrid.yaml"), overrides)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size)
    t, b, s = cfg.train, cfg.train.micro_batch_size, cfg.data.seq_len
    precision = ds_engine.resolve_precision(t.precision)
    ctx = groups.initialize(cfg.parallel)
    ids = torch.randint(0, model_cfg.vocab_size, (b, s))
    warm = LanguageModel(model_cfg)  # library caches (oneDNN, FFT plans) set up outside the measurement
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ds_engine.computes_in_bf16(precision)):
        warm(ids, labels=ids).backward()
    del warm

    def train_two_steps() -> None:
        model = build_model(model_cfg, cfg.parallel, cfg.seed, ctx.dp_size)
        engine = ds_engine.initialize(model, param_groups(model, t.lr, t.weight_decay),
                                      ds_engine.deepspeed_config(t, ctx.dp_size), lambda step: 1.0)
        for _ in range(2):
            engine.backward(engine(ids, labels=ids))
            engine.step()

    measured = peak_rss_growth(train_two_steps)
    estimate = estimate_memory(full_parameter_count(model_cfg), model_cfg, t, s, model_cfg.vocab_size, ctx.dp_size,
                               precision, checkpointing=cfg.parallel.activation_checkpointing)
    groups.destroy()
    return {"measured": measured, "estimate": estimate}


def run_case(overrides: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # JIT ops built once
    out = subprocess.run([sys.executable, __file__, "--measure", *overrides], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs="*", help=argparse.SUPPRESS)  # one case, in this fresh process
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return
    from tqdm import tqdm

    mib = 2**20
    print("debug_hybrid (micro-batch 8 x 128 tokens, vocab 4096), 1 CPU rank, DeepSpeed engine, 2 steps; MiB")
    header = f"{'case':<26}{'weights':>8}{'master':>8}{'grads':>8}{'adam':>8}{'activ.':>8}{'estimate':>10}"
    print(header + f"{'measured':>10}{'est/meas':>9}")
    for name, overrides in tqdm(CASES.items(), desc="cases", leave=False):
        result = run_case(overrides)
        e = result["estimate"]
        parts = [e[k] / mib for k in ("weights", "master_weights", "gradients", "optimizer_states", "activations")]
        tqdm.write(f"{name:<26}" + "".join(f"{p:>8.1f}" for p in parts) + f"{e['total'] / mib:>10.1f}"
                   f"{result['measured'] / mib:>10.1f}{e['total'] / result['measured']:>9.2f}")


if __name__ == "__main__":
    main()
