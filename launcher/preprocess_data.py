"""Tokenise corpora into sharded megatron-core IndexedDataset files, in parallel and resumably.

``python launcher/preprocess_data.py --input pile=/data/pile --input pg19=/data/pg19 --tokenizer tok.model
--out shards/`` (local process pool), or the same under ``mpirun -np 4`` (one MPI rank per process).
Rerunning after an interruption skips the finished shards. Train with ``data.indexed=shards/``.
"""

from __future__ import annotations

import argparse
import os
import sys

from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.preprocess import PreprocessSettings, parse_inputs, preprocess


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = PreprocessSettings()
    parser = argparse.ArgumentParser(
        description="Tokenise Pile / PG-19 / text / HF-datasets sources into sharded IndexedDataset (.bin/.idx) "
        "files with a manifest per shard and a report reconciling documents read = written + skipped.",
        epilog="Example: python launcher/preprocess_data.py --input pile=../shared/data/pile_sample "
        "--input pg19=../shared/data/pg19_sample --tokenizer runs/tok/pile_pg19.model --out runs/shards",
    )
    parser.add_argument("--input", action="append", required=True, metavar="NAME=SPEC",
                        help="a named input: NAME becomes the folder and blend name, SPEC a data.path spec; repeatable")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model (see launcher/train_tokenizer.py)")
    parser.add_argument("--out", required=True, help="output folder (reused on rerun: finished shards are skipped)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="local processes (default: all cores); under mpirun each rank runs one")
    parser.add_argument("--shard-bytes", type=int, default=d.shard_bytes,
                        help=f"group small input files into shards of about this many bytes (default {d.shard_bytes})")
    parser.add_argument("--max-doc-chars", type=int, default=d.max_doc_chars,
                        help=f"chunk longer documents at paragraph breaks; 0: never (default {d.max_doc_chars})")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction,
                        help="documents held out by hash for validation from inputs without a validation split "
                        f"(default {d.val_fraction})")
    parser.add_argument("--max-line-bytes", type=int, default=d.max_line_bytes,
                        help="skip (and count as line_too_long) JSON-lines records longer than this "
                        f"(default {d.max_line_bytes})")
    parser.add_argument("--pile-sets", default="",
                        help="comma-separated meta.pile_set_name values to keep (default: all), e.g. Github,PythonDocs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = PreprocessSettings(
            shard_bytes=args.shard_bytes, max_doc_chars=args.max_doc_chars, val_fraction=args.val_fraction,
            pile_sets=tuple(s.strip() for s in args.pile_sets.split(",") if s.strip()),
            max_line_bytes=args.max_line_bytes,
        )
        report = preprocess(parse_inputs(args.input), args.out, args.tokenizer, settings, args.workers)
        return 0 if report["reconciled"] else 1
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
