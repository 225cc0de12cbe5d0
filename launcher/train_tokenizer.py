"""Train a SentencePiece tokenizer: ``python launcher/train_tokenizer.py --input /data/pile --out tok/pile32k``.

Writes `<out>.model` plus `<out>.json` (sha256, settings, inputs); the sha256 is what every shard
manifest built with this tokenizer records.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.sources import parse_sources
from hybrid_pretrain.data_pipeline.tokenizer import MARKERS, Tokenizer, train_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a SentencePiece tokenizer (byte fallback; pad/unk/bos/eos and retrieval markers) on a "
        "deterministic sample of one or more corpora.",
        epilog="Example: python launcher/train_tokenizer.py --input /data/pile_sample --input /data/pg19_sample "
        "--out runs/tok/pile_pg19 --vocab-size 32000",
    )
    parser.add_argument("--input", action="append", required=True,
                        help="a data.path spec (.jsonl.zst files/globs, Pile/PG-19 folder, .txt, hf:...); repeatable")
    parser.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.json")
    parser.add_argument("--vocab-size", type=int, default=32000, help="pieces in the vocabulary (default 32000)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece algorithm")
    parser.add_argument("--sample-bytes", type=int, default=100_000_000,
                        help="UTF-8 bytes of training text, taken round-robin across inputs (default 100 MB)")
    return parser.parse_args(argv)


def interleaved_documents(specs: list[str]) -> Iterator[str]:
    """Training documents of every source, one from each in turn, so a byte budget covers all inputs.

    A plain prefix of the concatenated corpus would train the tokenizer on the first input only.
    """
    streams = [source.documents("train") for spec in specs for source in parse_sources(spec)]
    for round_ in itertools.zip_longest(*streams):
        yield from (doc for doc in round_ if doc is not None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.vocab_size < 64:
            raise DataError(f"--vocab-size must be at least 64, got {args.vocab_size}")
        if args.sample_bytes <= 0:
            raise DataError(f"--sample-bytes must be positive, got {args.sample_bytes}")
        model = train_tokenizer(interleaved_documents(args.input), args.out, args.vocab_size, args.sample_bytes,
                                model_type=args.model_type)
        tok = Tokenizer(model)
        info = {
            "model": str(model), "sha256": tok.sha256, "vocab_size": tok.vocab_size, "model_type": args.model_type,
            "requested_vocab_size": args.vocab_size, "sample_bytes": args.sample_bytes, "inputs": args.input,
            "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id,
                            **{m: i for m, i in tok.marker_ids.items() if m in MARKERS}},
        }
        Path(f"{args.out}.json").write_text(json.dumps(info, indent=1) + "\n")
        print(f"tokenizer: {model} ({tok.vocab_size} pieces, {args.model_type}), sha256 {tok.sha256}")
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
