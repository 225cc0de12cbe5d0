"""Sample text from a trained run: ``python launcher/generate.py runs/debug_hybrid --prompt "def main("``.

Reads like a table of contents: load the run's config, weights and tokenizer -> build the model ->
encode the prompts -> generate (prefill, then recurrent steps) -> decode and print.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.malloc import keep_freed_memory
from hybrid_pretrain.models.generation import Sampling, generate
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.safe_load import add_trust_flag
from hybrid_pretrain.training.weights import build_model, load_run

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate text from a launcher/pretrain.py run (any ZeRO stage), batching all prompts.",
        epilog='Example: python launcher/generate.py runs/debug_hybrid --prompt "import os" --prompt "def f(" '
        "--max-new-tokens 64 --temperature 0.8 --top-p 0.95",
    )
    parser.add_argument("run_dir", help="run directory holding config.yaml, checkpoints/ and data/tokenizer.model")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step00000150 (default: newest intact one)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    parser.add_argument("--prompt-file", help="a file with one prompt per line (added to --prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: all)")
    parser.add_argument("--stop-at-eos", action="store_true", help="end a sequence at the tokenizer's EOS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_trust_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # CPU temporaries reuse heap pages (base/malloc.py)

    try:
        prompts = list(args.prompt)
        if args.prompt_file:
            path = Path(args.prompt_file)
            if not path.is_file():
                raise ConfigError(f"--prompt-file '{path}' does not exist; expected a text file, one prompt a line")
            prompts += [line for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError("no prompt given; expected --prompt TEXT (repeatable) or --prompt-file FILE")
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
        try:
            sampling = Sampling(0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
        except ValueError as e:
            raise ConfigError(f"sampling flags: {e}") from None
        weights = load_run(args.run_dir, args.tag, args.trust_checkpoint)
        if weights.tokenizer is None:
            raise ConfigError(f"{args.run_dir}/data/tokenizer.model is missing; expected the run's tokenizer")
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model = build_model(weights, device, getattr(torch, DTYPES[args.dtype]))
    tok = weights.tokenizer
    encoded = [tok.encode(p) or [tok.eos_id] for p in prompts]  # an empty prompt starts from EOS
    lengths = torch.tensor([len(ids) for ids in encoded])
    batch = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for b, ids in enumerate(encoded):
        batch[b, : len(ids)] = torch.tensor(ids)
    max_len = int(lengths.max()) + args.max_new_tokens
    if "A" in weights.config.model.layers and max_len > weights.config.model.max_seq_len:
        print(f"warning: {max_len} tokens exceed model.max_seq_len {weights.config.model.max_seq_len}", file=sys.stderr)

    start = time.perf_counter()
    out = generate(model, batch.to(device), args.max_new_tokens, sampling, lengths, eos_id=tok.eos_id
                   if args.stop_at_eos else None, pad_id=-1, generator=torch.Generator(device).manual_seed(args.seed))
    seconds = time.perf_counter() - start
    for b, prompt in enumerate(prompts):
        new = [t for t in out[b, len(encoded[b]):].tolist() if t >= 0]
        print(f"=== [{b}] {prompt}")
        print(tok.decode(encoded[b] + new))
    new_tokens = int((out[:, :] >= 0).sum() - lengths.sum())
    print(f"{new_tokens} new tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, batch {len(prompts)}, "
          f"checkpoint {weights.tag}, {device})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
