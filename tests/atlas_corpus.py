"""A tiny tokenizer and passage store of generated prose, shared by the Atlas tests (seconds to build)."""

from __future__ import annotations

from pathlib import Path

from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer
from hybrid_pretrain.retrieval.passages import PassageStore, write_store
from hybrid_pretrain.tests.data_pipeline.corpora import prose


def tiny_tokenizer(folder: Path) -> Tokenizer:
    """A 320-piece tokenizer trained on 30 generated documents."""
    return Tokenizer(train_tokenizer([prose(i, 400) for i in range(30)], folder / "tok", vocab_size=320,
                                     sample_bytes=200_000))


def tiny_store(folder: Path) -> PassageStore:
    """12 generated documents cut into 30-word passages."""
    return write_store(folder / "passages", [("prose", i, prose(i, 120)) for i in range(12)], words=30,
                       progress=False)
