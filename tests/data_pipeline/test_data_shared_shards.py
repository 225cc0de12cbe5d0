"""The staged development corpus (../shared/data) through preprocessing and the 0.7 / 0.3 blend."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid_pretrain.data_pipeline.indexed import IndexedData
from hybrid_pretrain.data_pipeline.preprocess import PreprocessSettings, preprocess
from hybrid_pretrain.tests.data_pipeline.corpora import shared_data_root, small_tokenizer


@pytest.mark.slow
def test_shared_pile_and_pg19_preprocess_reconcile_and_blend(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path) -> None:
    root = shared_data_root()
    tok = small_tokenizer(tmp_path_factory)
    inputs = {"pile": str(root / "pile_sample"), "pg19": str(root / "pg19_sample")}
    report = preprocess(inputs, tmp_path / "shards", tok, PreprocessSettings(shard_bytes=8_000_000), workers=2,
                        log=lambda m: None)
    assert report["reconciled"] and report["documents_skipped"] == 0
    assert report["documents_read"] == 371 * 3 + 62 + 61 + 24  # SOURCES.md: Pile docs + 24 books
    assert {"pile/train/Github", "pile/train/DM_Mathematics", "pg19/train/pg19", "pg19/test/pg19"} <= set(
        report["tokens_by_set"])
    data = IndexedData.open(tmp_path / "shards", 256, seed=1, blend=["0.7 pile", "0.3 pg19"], log=lambda m: None)
    prefixes, weights = data.blend["train"]
    pg19 = sum(w for p, w in zip(prefixes, weights) if Path(p).relative_to(tmp_path / "shards").parts[0] == "pg19")
    assert abs(pg19 - 0.3) < 1e-9 and abs(sum(weights) - 1.0) < 1e-9
    assert data.test is not None and len(data.test) > 0 and len(data.val) > 0
