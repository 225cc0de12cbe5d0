"""Training throughput, hybrid H3 vs an all-attention Transformer, side by side: ``python bench/train_throughput.py``.

Tokens/s of one optimizer step (forward, backward, AdamW) at sequence lengths 1K / 2K / 4K / 8K with
the same width, depth, FFN and vocabulary; the Transformer replaces every H3 layer by attention
(PyTorch SDPA, the flash kernel on CPU and GPU). H3 layers cost O(L log L) (FFT convolution; O(L) by chunks
when training on CPU from 1K steps), attention O(L^2), so the ratio grows with L.

Default shape is small (d_model 256, 4 layers, 4k vocabulary, batch 1) for a laptop CPU; on a GPU use
e.g. ``--config configs/h3_hybrid_125m.yaml --device cuda --dtype bf16 --batch 4``.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from hybrid_pretrain.base.malloc import OPT_OUT, keep_freed_memory
from hybrid_pretrain.bench.shapes import add_shape_args, hybrid_and_transformer
from hybrid_pretrain.models.lm import LanguageModel


def step_seconds(model: LanguageModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor, dtype: torch.dtype
                 ) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(ids, labels=ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser, "configs/h3_hybrid_125m.yaml")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="sequence lengths, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cell (best taken)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    print(f"malloc: {keep_freed_memory()} ({OPT_OUT}=system for glibc's defaults)", flush=True)
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    configs = hybrid_and_transformer(args, max(lengths))
    hybrid = configs[0]
    torch.manual_seed(0)
    models = [LanguageModel(cfg).to(args.device) for cfg in configs]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    print(f"hybrid '{configs[0].layers}' vs Transformer '{configs[1].layers}': d_model {hybrid.d_model}, "
          f"vocab {hybrid.vocab_size}, batch {args.batch}; {args.device} {args.dtype}, {torch.get_num_threads()} "
          f"threads; one step = forward + backward + AdamW, best of {args.repeats}")
    rows = []
    for length in tqdm(lengths, desc="train throughput", unit="length"):
        ids = torch.randint(0, hybrid.vocab_size, (args.batch, length), device=args.device)
        best = [float("inf"), float("inf")]
        for i in range(args.repeats + 1):  # round 0 warms up; the models alternate so load hits both alike
            for j, (model, opt) in enumerate(zip(models, optimizers)):
                t = step_seconds(model, opt, ids, dtype)
                if i:
                    best[j] = min(best[j], t)
        rows.append((length, *(args.batch * length / b for b in best)))
    print(f"{'length':>6} {'hybrid tok/s':>13} {'transformer tok/s':>18} {'speed-up':>9}")
    for length, h, t in rows:
        print(f"{length:>6} {h:>13.1f} {t:>18.1f} {h / t:>8.2f}x")


if __name__ == "__main__":
    main()
