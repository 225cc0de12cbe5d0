"""Consolidate a training run into one portable folder: ``python launcher/convert_checkpoint.py runs/X --out ckpt/X``.

Reads like a table of contents: load the run (any ZeRO stage, checksums verified) -> write
model.safetensors + config.json + config.yaml + tokenizer.model -> with ``--format hf`` also the
Hugging Face configuration and modeling files, so ``AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)`` loads it (the project package must be installed there: the modeling file
imports ``models.lm``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.weights import load_run, save_consolidated

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
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle anything the checkpoint files hold (they can run code): only for a folder you "
                        "or someone you trust wrote; by default only tensors and DeepSpeed's own types are read")
    return parser.parse_args(argv)


def convert(run_dir: str | Path, out: str | Path, tag: str | None = None, fmt: str = "safetensors",
            trust: bool = False) -> Path:
    """Write the consolidated checkpoint of `run_dir` into `out`; returns `out`."""

    weights = load_run(run_dir, tag, trust)
    out = save_consolidated(weights, out, HF_CONFIG if fmt == "hf" else None)
    if fmt == "hf":
        for name in HF_FILES:
            shutil.copyfile(HF_DIR / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        out = convert(args.run_dir, args.out, args.tag, args.format, args.trust_checkpoint)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
