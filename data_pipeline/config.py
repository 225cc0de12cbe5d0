"""Data hyper-parameters for the training corpus, validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where text comes from and how it becomes training sequences.

    `path` empty means the embedded default corpus (Python standard-library sources, a Pile-style
    "Github" set every Python installation carries). Otherwise a comma-separated list of Pile-style
    `.jsonl.zst` / `.jsonl` files or globs, Pile-style folders (`train/*.jsonl.zst` + `val.jsonl.zst`),
    PG-19-style folders (`train|validation|test/<id>.txt` + `metadata.csv`), or plain `.txt` files.
    """

    path: str = ""
    seq_len: int = 256
    tokenizer: str = ""  # an existing SentencePiece .model; empty: train one on the corpus
    vocab_size: int = 4096  # when training a tokenizer
    tokenizer_sample_bytes: int = 20_000_000  # deterministic sample the tokenizer is trained on
    max_corpus_bytes: int = 0  # stop reading the corpus after this many bytes (0: no limit)
    val_fraction: float = 0.02  # documents held out for validation when the source has no split
