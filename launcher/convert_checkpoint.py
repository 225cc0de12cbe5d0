"""Consolidate a training run into one portable folder: ``python launcher/convert_checkpoint.py runs/X --out ckpt/X``.

Reads like a table of contents: load the run (any ZeRO stage, checksums verified) -> write
model.safetensors + config.json + config.yaml + tokenizer.model -> with ``--format hf`` also the
Hugging Face configuration and modeling files and a README (model card) saying how to install and
generate, so ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` loads it and
``.generate(...)`` works (the project package must be installed there: the modeling file imports
``hybrid_pretrain.models.lm`` and ``hybrid_pretrain.models.generation``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hybrid_pretrain.training.weights import RunWeights

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.safe_load import add_trust_flag
from hybrid_pretrain.training.weights import cast_weights, load_run, save_consolidated

HF_DIR = Path(__file__).resolve().parents[1] / "models" / "hf"
HF_FILES = ("configuration_hybrid_lm.py", "modeling_hybrid_lm.py")
HF_CONFIG = {
    "model_type": "hybrid_lm",
    "architectures": ["HybridLMForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_hybrid_lm.HybridLMConfig",
        "AutoModelForCausalLM": "modeling_hybrid_lm.HybridLMForCausalLM",
    },
}
# The converted folder's README.md: what to install where it is loaded, and how to generate.
MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-generation
tags:
- hybrid-pretrain
- custom_code
---

# {name}

A hybrid-pretrain language model: layers `{layers}`{ffn}, d_model {d_model}, vocabulary {vocab_size};
checkpoint `{tag}`, converted by hybrid-pretrain {version} (transformers {transformers}, torch {torch}).

## Install

`modeling_hybrid_lm.py` imports the `hybrid_pretrain` package, so install it with its `hf` extra
(transformers>=5,<6) wherever this folder is loaded:

```bash
pip install torch=={torch_public}   # first: the CPU build, or the CUDA build that matches your drivers
pip install -e '/path/to/hybrid-pretrain[hf]'   # a checkout of the hybrid-pretrain repository (or its wheel)
```

## Generate

```python
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM

path = "path/to/{name}"
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
sp = spm.SentencePieceProcessor(model_file=f"{{path}}/tokenizer.model")
prompts = [sp.encode(text) for text in ["def main(", "import os\\nimport"]]
L = max(map(len, prompts))  # left padding: every row continues from its own last token
ids = torch.tensor([[{pad}] * (L - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
out = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id={pad})
print([sp.decode(row[L:].tolist()) for row in out])
```

Greedy output is token for token that of `python launcher/generate.py RUN_DIR --greedy` on the same
prompts. The recurrent state (H3 state, attention KV cache) is carried between steps in a
`HybridLMCache`, so an H3 layer does constant work per new token. Greedy search and sampling are
supported; beam search, assisted and contrastive decoding are not.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert a launcher/pretrain.py run (DeepSpeed checkpoint, any ZeRO stage) into a consolidated "
        "safetensors checkpoint with its config and tokenizer.",
        epilog="Example: python launcher/convert_checkpoint.py runs/debug_hybrid --out ckpt/debug_hybrid --format hf",
    )
    parser.add_argument("run_dir", help="run directory holding config.yaml, checkpoints/ and data/tokenizer.model")
    parser.add_argument("--out", required=True, help="output folder (created; existing files are replaced)")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step00000150 (default: newest intact one)")
    parser.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                        help="hf also writes the transformers configuration/modeling files (default: safetensors)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights as stored: fp32 (the master weights, exact) or bf16 (half the size, what a "
                             "bf16 run computes with; the SSM dynamics dt, A, ... stay fp32)")
    add_trust_flag(parser)
    return parser.parse_args(argv)


def convert(run_dir: str | Path, out: str | Path, tag: str | None = None, fmt: str = "safetensors",
            trust: bool = False, dtype: str = "fp32") -> Path:
    """Write the consolidated checkpoint of `run_dir` into `out`; returns `out`."""

    weights = load_run(run_dir, tag, trust)
    if dtype == "bf16":
        cast_weights(weights, torch.bfloat16)  # the SSM dynamics (dt, A, ...) stay fp32
    out = save_consolidated(weights, out, HF_CONFIG if fmt == "hf" else None)
    if fmt == "hf":
        for name in HF_FILES:
            shutil.copyfile(HF_DIR / name, out / name)
        (out / "README.md").write_text(model_card(weights, out.name))
    return out


def model_card(weights: RunWeights, name: str) -> str:
    """The README of a folder converted with ``--format hf``: the model, the install steps, a generate example."""
    try:
        transformers = version("transformers")
    except PackageNotFoundError:  # an optional dependency: converting does not need it
        transformers = "not installed"
    cfg = weights.config.model
    return MODEL_CARD.format(
        name=name, layers=cfg.layers, ffn=f", ffn `{cfg.ffn}`" if cfg.ffn else "", d_model=cfg.d_model,
        vocab_size=cfg.vocab_size, tag=weights.tag, version=version("hybrid-pretrain"),
        transformers=transformers, torch=torch.__version__, torch_public=torch.__version__.split("+")[0],
        pad=weights.tokenizer.pad_id if weights.tokenizer is not None else 0,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        out = convert(args.run_dir, args.out, args.tag, args.format, args.trust_checkpoint, args.dtype)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
