"""Sequence / image classification: ``python launcher/classify.py --task digits --layers SS --epochs 10``.

Load config (``--config`` YAML, then flags) -> generate or load the task -> build the SequenceClassifier
(or ViT) -> train -> print the final test accuracy as the last line (``final test accuracy: 0.9533``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.classify.config import load_config
from hybrid_pretrain.classify.train import train_classifier

# flag -> (config field, type, help); a flag left out keeps the config's (or the default) value.
FLAGS = {
    "--task": ("task", str, "listops or digits"),
    "--model": ("model", str, "sequence (SequenceClassifier over --layers) or vit (digit images)"),
    "--input": ("input", str, "digits as tokens, values or images (vit)"),
    "--layers": ("layers", str, "layer pattern, one symbol per layer, e.g. SS, 55, MM, rA (ViT: AAAA)"),
    "--width": ("d_model", int, "d_model"),
    "--heads": ("n_heads", int, "attention heads"),
    "--d-state": ("d_state", int, "SSM state size"),
    "--pooling": ("pooling", str, "mean (bidirectional / LRA) or last (causal stacks)"),
    "--patch-size": ("patch_size", int, "ViT patch side on 8x8 digits: 2 or 4"),
    "--train-size": ("train_size", int, "listops training examples"),
    "--test-size": ("test_size", int, "listops test examples"),
    "--max-len": ("max_len", int, "listops tokens per expression at most"),
    "--epochs": ("epochs", int, "training epochs"),
    "--batch-size": ("batch_size", int, "examples per step"),
    "--lr": ("lr", float, "peak learning rate (AdamW, warmup + cosine)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay"),
    "--eval-every": ("eval_every", int, "epochs between test evaluations"),
    "--seed": ("seed", int, "seed of data split, order and initialisation"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a classifier on ListOps or scikit-learn's digits and report its test accuracy. "
        "Bidirectional mixers take options: --option s5.bidirectional=true.",
        epilog="e.g. --config configs/debug_vit.yaml; --task listops --layers MM --option mega.bidirectional=true",
    )
    parser.add_argument("--config", type=Path, help="YAML of classify.config.ClassifyConfig fields")
    for flag, (_, kind, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="a model.options entry (YAML value), e.g. mega.chunk_size=16; repeatable")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="log evaluations as lines instead of a bar")
    return parser.parse_args(argv)


def _options(entries: list[str]) -> dict:
    options: dict = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not name or not field:
            raise ConfigError(f"--option expects NAME.KEY=VALUE (e.g. s5.bidirectional=true), got '{entry}'")
        options.setdefault(name, {})[field] = yaml.safe_load(value)
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in FLAGS.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        if args.config is None and "task" not in overrides:
            raise ConfigError("give --task (listops or digits) or --config FILE")
        if args.option:
            overrides["options"] = _options(args.option)
        run = load_config(args.config, **overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, acc, _ = train_classifier(run, progress=not args.no_progress)
    print(f"final test accuracy: {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
