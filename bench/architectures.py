"""Architectures next to a Transformer baseline: ``python bench/architectures.py --configs configs/debug_x.yaml ...``.

Each config's model is trained in-process on the same data (the embedded standard-library corpus, or
``--data``), for the same number of steps with the same batches, seed, optimizer and schedule (the
config's train.lr / warmup, AdamW, cosine decay); then evaluated on the same validation batches. The
baseline is an all-attention Transformer (``--baseline-layers``, default "AAAA") with the first
config's width, heads and feed-forward size. Prints a markdown table: parameters, training tokens/s,
final eval loss, and both as ratios to the baseline. The models take their steps in turn (step 1 of
each, then step 2, ...) so that a change in machine load hits all of them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hybrid_pretrain.data_pipeline.packing import PreparedData, prepare_data
from hybrid_pretrain.data_pipeline.sampler import RankBatches, eval_batches
from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.training.config import RunConfig, load_config
from hybrid_pretrain.training.optimizer import param_groups, warmup_cosine


@dataclasses.dataclass
class Result:
    name: str
    params: int
    tokens_per_s: float
    eval_loss: float


class Trainee:
    """One model with its optimizer, schedule and batch stream (seeded: every trainee sees the same batches)."""

    def __init__(self, name: str, model_cfg: ModelConfig, run: RunConfig, data: PreparedData,
                 args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.name, self.model, self.train_cfg = name, build_arch(model_cfg), run.train
        t = run.train
        self.opt = torch.optim.AdamW(param_groups(self.model, t.lr, t.weight_decay), lr=t.lr, betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(min(t.warmup_steps, args.steps), args.steps, t.min_lr_ratio))
        self.batches = RankBatches(data.train, args.batch, seed=args.seed)
        self.tokens, self.seconds = 0, 0.0

    def step(self) -> None:
        batch = next(self.batches)
        self.model.train()
        start = time.perf_counter()
        loss = self.model(batch[:, :-1], labels=batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - start
        self.tokens += batch[:, 1:].numel()

    @torch.no_grad()
    def result(self, data: PreparedData, args: argparse.Namespace) -> Result:
        self.model.eval()
        losses = [self.model(b[:, :-1], labels=b[:, 1:]).item()
                  for b in eval_batches(data.val, args.batch, num_batches=args.eval_batches)]
        params = sum(p.numel() for p in self.model.parameters())
        return Result(self.name, params, self.tokens / self.seconds, sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="YAML configs, e.g. configs/debug_*.yaml")
    parser.add_argument("--baseline-layers", default="AAAA", help="layer pattern of the Transformer baseline")
    parser.add_argument("--steps", type=int, default=100, help="training steps per model")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="", help="data.path (default: the embedded standard-library corpus)")
    parser.add_argument("--data-dir", default="runs/bench_architectures/data", help="prepared-data cache folder")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in args.configs:
        if not Path(path).is_file():
            parser.error(f"--configs: '{path}' is not a file; expected YAML configs such as configs/debug_deq.yaml")

    runs = [(Path(p).stem, load_config(p, [f"data.seq_len={args.seq_len}", f"data.path={args.data}"]))
            for p in args.configs]
    data_cfg = runs[0][1].data  # one tokenizer and token stream for every model
    prepare_data(data_cfg, args.data_dir)
    data = PreparedData.load(args.data_dir)
    first = runs[0][1].model
    baseline = ModelConfig(d_model=first.d_model, n_heads=first.n_heads, d_ffn=first.d_ffn,
                           layers=args.baseline_layers, vocab_size=data.vocab_size)
    jobs = [(f"transformer {args.baseline_layers}", baseline, runs[0][1])]
    jobs += [(name, dataclasses.replace(run.model, vocab_size=data.vocab_size), run) for name, run in runs]
    print(f"{len(jobs)} models x {args.steps} steps of {args.batch} x {args.seq_len} tokens, eval on "
          f"{args.eval_batches} validation batches; {torch.get_num_threads()} threads", flush=True)
    trainees = [Trainee(name, cfg, run, data, args) for name, cfg, run in jobs]
    for _ in tqdm(range(args.steps), desc="train (all models, step by step)", unit="step"):
        for trainee in trainees:  # interleaved, so a change in machine load hits every model alike
            trainee.step()
    results = [trainee.result(data, args) for trainee in trainees]

    base = results[0]
    print("\n| model | parameters | train tokens/s | eval loss | speed vs baseline | eval loss vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        loss_ratio = r.eval_loss / base.eval_loss if math.isfinite(r.eval_loss) else float("nan")
        print(f"| {r.name} | {r.params / 1e6:.2f} M | {r.tokens_per_s:,.0f} | {r.eval_loss:.3f} | "
              f"{r.tokens_per_s / base.tokens_per_s:.2f}x | {loss_ratio:.3f} |")


if __name__ == "__main__":
    main()
