"""Attention variants next to a Transformer baseline, side by side: ``python bench/attention_variants.py``.

Trains, in one process and in lockstep (one step of each model in turn, so machine load hits all alike),
a 2-layer Transformer ("AA") and the same-width Linear Transformer ("LL"), BigBird ("BB"), Block-Recurrent
Transformer ("BR": a sliding-window layer + the recurrent layer) and Perceiver AR (cross-attention + one
latent self-attention layer) on the same batches of the same corpus, then prints training tokens/s and
validation loss with their ratios to the baseline.

Perceiver AR predicts only its N latent (last) positions, so the table also gives every model's validation
loss on those last N positions: that column compares like with like. Its tokens/s counts input tokens
(all L context positions), as for the others.

Data: the embedded corpus by default, or ``--data ../shared/data/pg19_sample`` (PG-19-style books).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hybrid_pretrain.data_pipeline.config import DataConfig
from hybrid_pretrain.data_pipeline.packing import PreparedData, prepare_data
from hybrid_pretrain.data_pipeline.sampler import RankBatches, eval_batches
from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.roles import IGNORE_INDEX


def variants(d_model: int, n_heads: int, vocab: int, seq_len: int, latents: int, block: int) -> dict[str, ModelConfig]:
    """Name -> config; all 2 layers deep, same width, FFN and vocabulary."""
    base = ModelConfig(vocab_size=vocab, d_model=d_model, n_heads=n_heads, layers="AA", max_seq_len=seq_len,
                       rotary_dim=d_model // n_heads // 2)
    window = {"block": block, "window": 1, "num_global": 0, "num_random": 0}
    return {
        "transformer AA": base,
        "linear_attention LL": dataclasses.replace(base, layers="LL", options={"linear_attention": {"chunk_size": 64}}),
        "bigbird BB": dataclasses.replace(base, layers="BB", options={"bigbird": {"block": block, "window": 1,
                                                                                 "num_global": 1, "num_random": 1}}),
        "block_recurrent BR": dataclasses.replace(base, layers="BR", options={
            "bigbird": window, "block_recurrent": {"block_len": block, "num_states": 16}}),
        "perceiver_ar xA": dataclasses.replace(base, arch="perceiver_ar", layers="A",
                                               options={"perceiver_ar": {"num_latents": latents}}),
    }


def last_positions(labels: torch.Tensor, n: int) -> torch.Tensor:
    """labels (B, L) with every position but the last n set to ignore."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, -n:] = labels[:, -n:]
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], latents: int) -> tuple[float, float]:
    """(mean loss over all predicted positions, mean loss over the last `latents` positions)."""
    model.eval()
    full = [model(b[:, :-1], labels=b[:, 1:]).item() for b in batches]
    last = [model(b[:, :-1], labels=last_positions(b[:, 1:], latents)).item() for b in batches]
    model.train()
    return sum(full) / len(full), sum(last) / len(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="data.path (empty: the embedded corpus)")
    parser.add_argument("--cache", default="runs/bench_attention_variants", help="prepared-data folder")
    parser.add_argument("--max-corpus-bytes", type=int, default=4_000_000)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--latents", type=int, default=64, help="Perceiver AR latents (the last N positions)")
    parser.add_argument("--block", type=int, default=32, help="BigBird block / BRT block length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data_cfg = DataConfig(path=args.data, seq_len=args.seq_len, vocab_size=args.vocab,
                          max_corpus_bytes=args.max_corpus_bytes, tokenizer_sample_bytes=args.max_corpus_bytes)
    data = PreparedData.load(prepare_data(data_cfg, Path(args.cache) / "data"))
    configs = variants(args.d_model, args.n_heads, data.vocab_size, args.seq_len, args.latents, args.block)
    models, optimizers = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        models[name] = build_arch(cfg)
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=args.lr, weight_decay=0.1)
    batches = RankBatches(data.train, args.batch, seed=0)
    val = list(eval_batches(data.val, args.batch, num_batches=args.eval_batches))
    seconds = dict.fromkeys(models, 0.0)
    for step in tqdm(range(args.steps), desc="train (all models in lockstep)", unit="step"):
        batch = next(batches)
        for name, model in models.items():
            t0 = time.perf_counter()
            loss = model(batch[:, :-1], labels=batch[:, 1:])
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:  # step 0 warms up
                seconds[name] += time.perf_counter() - t0
    tokens = (args.steps - 1) * args.batch * args.seq_len
    print(f"{args.steps} steps of batch {args.batch} x {args.seq_len} tokens, d_model {args.d_model}, vocab "
          f"{data.vocab_size}, data {args.data or 'embedded corpus'}; {torch.get_num_threads()} threads; "
          f"eval on {len(val)} validation batches")
    print(f"{'model':<20} {'params':>8} {'tok/s':>8} {'x base':>7} {'val loss':>9} {'Δ base':>7} "
          f"{f'val last {args.latents}':>12} {'Δ base':>7}")
    base = None
    for name, model in models.items():
        full, last = evaluate(model, val, args.latents)
        speed = tokens / seconds[name]
        params = sum(p.numel() for p in model.parameters())
        if base is None:
            base = (speed, full, last)
        is_perceiver = configs[name].arch == "perceiver_ar"
        full_s = "-" if is_perceiver else f"{full:.3f}"
        full_d = "-" if is_perceiver else f"{full - base[1]:+.3f}"
        print(f"{name:<20} {params / 1e6:>7.2f}M {speed:>8.0f} {speed / base[0]:>6.2f}x {full_s:>9} {full_d:>7} "
              f"{last:>12.3f} {last - base[2]:>+7.3f}")


if __name__ == "__main__":
    main()
