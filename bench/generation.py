"""Generation throughput, hybrid H3 vs an all-attention Transformer, side by side: ``python bench/generation.py``.

The H3 paper's Table 6 setting: prompts of 512 / 1024 / 1536 tokens, 128 new tokens, batch 1 and 8;
tokens/s counts the new tokens (prefill included in the time). Both models share width, depth, FFN and
vocabulary; the Transformer replaces every H3 layer by attention. Each H3 layer decodes in O(1) per
token, each attention layer in O(position), so the ratio grows with the prompt.

The default shape is small (d_model 256, 4 layers, 4k vocabulary) so it runs on a laptop CPU. The
paper's 1.3B shape on a GPU: ``--config configs/h3_hybrid_1.3b.yaml --device cuda --dtype bf16``
(paper, 1.3B on A100: 1.48x / 2.05x / 2.38x for the three prompt lengths).
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from hybrid_pretrain.base.malloc import OPT_OUT, keep_freed_memory
from hybrid_pretrain.bench.shapes import add_shape_args, hybrid_and_transformer
from hybrid_pretrain.models.generation import GREEDY, generate
from hybrid_pretrain.models.lm import LanguageModel


def seconds(model: LanguageModel, prompt: torch.Tensor, new: int) -> float:
    if prompt.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompt, new, GREEDY)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser, "configs/h3_hybrid_1.3b.yaml")
    parser.add_argument("--prompts", default="512,1024,1536", help="prompt lengths, comma-separated")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--new", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (best taken)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    print(f"malloc: {keep_freed_memory()} ({OPT_OUT}=system for glibc's defaults)", flush=True)
    args.prompts = [int(p) for p in args.prompts.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    torch.manual_seed(0)
    configs = hybrid_and_transformer(args, max(args.prompts) + args.new)
    models = [LanguageModel(cfg).to(args.device, dtype).eval() for cfg in configs]
    n = sum(p.numel() for p in models[0].parameters())
    print(f"hybrid '{configs[0].layers}' vs Transformer '{configs[1].layers}': d_model {configs[0].d_model}, "
          f"vocab {configs[0].vocab_size}, {n / 1e6:.1f}M params (hybrid); {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads; {args.new} new tokens, best of {args.repeats}")
    rows = []
    cells = [(b, p) for b in args.batches for p in args.prompts]
    for batch, length in tqdm(cells, desc="generation", unit="cell"):
        prompt = torch.randint(0, configs[0].vocab_size, (batch, length), device=args.device)
        best = [float("inf")] * 2
        prefill = [float("inf")] * 2
        for i in range(args.repeats + 1):  # the first round warms up; the models alternate within each round
            for j, model in enumerate(models):
                t, p = seconds(model, prompt, args.new), seconds(model, prompt, 0)
                if i:
                    best[j], prefill[j] = min(best[j], t), min(prefill[j], p)
        decode = [batch * args.new / max(b - p, 1e-9) for b, p in zip(best, prefill)]
        rows.append((batch, length, *(batch * args.new / b for b in best), *prefill, *decode))
    print("tok/s: new tokens over the whole call (prefill included), as the paper; then the prefill alone and the")
    print("decoding steps alone (tok/s without the prefill)")
    print(f"{'batch':>5} {'prompt':>6} {'hybrid tok/s':>13} {'transf. tok/s':>14} {'speed-up':>9} "
          f"{'prefill s (H/T)':>16} {'decode tok/s (H/T)':>19} {'decode speed-up':>16}")
    for batch, length, h, t, ph, pt, dh, dt in rows:
        print(f"{batch:>5} {length:>6} {h:>13.1f} {t:>14.1f} {h / t:>8.2f}x {ph:>7.2f}/{pt:<8.2f} "
              f"{dh:>9.1f}/{dt:<9.1f} {dh / dt:>15.2f}x")


if __name__ == "__main__":
    main()
