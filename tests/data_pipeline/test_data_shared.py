"""The staged development corpus (shared/data): real Pile shards and PG-19 books. Skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid_pretrain.data_pipeline.config import DataConfig
from hybrid_pretrain.data_pipeline.packing import PreparedData, prepare_data
from hybrid_pretrain.data_pipeline.sampler import RankBatches
from hybrid_pretrain.data_pipeline.sources import parse_sources, resolve_sources
from hybrid_pretrain.tests.data_pipeline import corpora


@pytest.fixture
def shared_data() -> Path:
    return corpora.shared_data_root()


def test_pile_shards_stream_without_skips(shared_data: Path) -> None:
    (source,) = parse_sources(str(shared_data / "pile_sample" / "train" / "*.jsonl.zst"))
    assert len(source.files()) == 3
    assert sum(1 for _ in source.documents()) == 3 * 371  # per SOURCES.md
    assert source.skips.total == 0


def test_pile_folder_has_validation_and_test_splits(shared_data: Path) -> None:
    (source,) = parse_sources(str(shared_data / "pile_sample"))
    assert source.splits == ("train", "validation", "test")
    assert sum(1 for _ in source.documents("validation")) == 62
    assert sum(1 for _ in source.documents("test")) == 61


def test_pg19_books_lose_their_licence_boilerplate(shared_data: Path) -> None:
    root = shared_data / "pg19_sample"
    train = list(resolve_sources(str(root), "train"))
    assert len(train) == 20 and len(list(resolve_sources(str(root), "validation"))) == 2
    assert not any("*** START OF THE PROJECT GUTENBERG" in d or "*** END OF THE PROJECT GUTENBERG" in d for d in train)
    pride = next(resolve_sources(str(root / "train" / "1342.txt")))
    assert pride.startswith("[Illustration") and "It is a truth universally acknowledged" in pride
    assert "The Project Gutenberg eBook of" not in pride and "Project Gutenberg License" not in pride


def test_prepare_pg19_sample_uses_its_validation_books(shared_data: Path, tmp_path: Path) -> None:
    cfg = DataConfig(
        path=str(shared_data / "pg19_sample"),
        seq_len=128,
        vocab_size=1024,
        tokenizer_sample_bytes=1_000_000,
        max_corpus_bytes=2_000_000,
    )
    data = PreparedData.load(prepare_data(cfg, tmp_path / "pg19", log=lambda m: None))
    assert data.meta["val"]["formed_by"] == "held_out" and data.meta["val"]["documents"] == 2
    assert data.meta["documents_skipped"] == 0
    assert next(RankBatches(data.train, 4, seed=0)).shape == (4, 129)


def test_prepare_mixed_pile_and_pg19(shared_data: Path, tmp_path: Path) -> None:
    spec = f"{shared_data}/pile_sample/train/0[01].jsonl.zst,{shared_data}/pg19_sample/train/16.txt"
    cfg = DataConfig(path=spec, seq_len=64, vocab_size=1024, tokenizer_sample_bytes=500_000, val_fraction=0.05)
    data = PreparedData.load(prepare_data(cfg, tmp_path / "mixed", log=lambda m: None))
    assert len(data.meta["inputs"]["sources"]) == 2
    assert data.meta["val"]["documents"] > 10
    assert data.meta["train"]["tokens"] > 10 * data.meta["val"]["tokens"]
