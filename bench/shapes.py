"""The hybrid-vs-Transformer model pair shared by the generation and training-throughput benchmarks."""

from __future__ import annotations

import argparse
import dataclasses

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.training.config import load_config


def add_shape_args(parser: argparse.ArgumentParser, config_example: str) -> None:
    parser.add_argument("--config", help=f"hybrid model shape from this YAML, e.g. {config_example}")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--layers", default="HAHH", help="hybrid pattern; the Transformer is all 'A' of this depth")
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary (when the config leaves it 0)")


def hybrid_and_transformer(args: argparse.Namespace, max_seq_len: int) -> tuple[ModelConfig, ModelConfig]:
    """(hybrid, transformer) configs of the same width, depth and vocabulary; the Transformer is all attention."""
    if args.config:
        hybrid = load_config(args.config).model
        hybrid.vocab_size = hybrid.vocab_size or args.vocab
    else:
        hybrid = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.n_heads, layers=args.layers,
                             h3_d_state=args.d_state)
    hybrid = dataclasses.replace(hybrid, layers=hybrid.layers.replace("|", ""), max_seq_len=max_seq_len)
    return hybrid, dataclasses.replace(hybrid, layers="A" * len(hybrid.layers))
