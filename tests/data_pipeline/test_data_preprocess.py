"""Preprocessing into IndexedDataset shards: content, bad input accounting, set selection, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.preprocess import (
    PreprocessSettings,
    _chunks,
    parse_inputs,
    plan_units,
    preprocess,
    set_slug,
)
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer
from hybrid_pretrain.tests.data_pipeline.corpora import make_pg19, prose, small_tokenizer, write_jsonl_zst

SETS = ("Github", "DM Mathematics", "PythonDocs")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tokenizer(tmp_path_factory)


def _pile(root: Path) -> dict[str, list[str]]:
    """Two good shards, one with bad records, plus a truncated one; returns the good texts per set."""
    good: dict[str, list[str]] = {s: [] for s in SETS}
    for shard in range(2):
        records: list = []
        for i in range(12):
            name = SETS[i % 3]
            text = prose(100 * shard + i, 60)
            good[name].append(text)
            records.append({"text": text, "meta": {"pile_set_name": name}})
        if shard == 1:
            records += ['{"text": "broken', {"text": ""}, {"meta": {}}]
        write_jsonl_zst(root / "train" / f"{shard:02d}.jsonl.zst", records)
    raw = zstandard.ZstdDecompressor().decompress((root / "train" / "01.jsonl.zst").read_bytes())
    raw += b'{"text": "caf\xe9 latin-1"}\n'  # invalid UTF-8
    (root / "train" / "01.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    full = write_jsonl_zst(root / "val.jsonl.zst", [{"text": prose(900 + i), "meta": {"pile_set_name": "Github"}}
                                                     for i in range(40)]).read_bytes()
    (root / "train" / "02.jsonl.zst").write_bytes(full[: len(full) // 2])  # truncated download
    return good


def _decoded(tokenizer: Tokenizer, prefix: Path) -> list[str]:
    ds = IndexedDataset(str(prefix))
    out = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]
        out.append(tokenizer.decode(ids[:-1]))
    return out


def test_pile_shards_hold_every_good_document_by_set_and_count_bad_ones(tmp_path: Path, tok: Path) -> None:
    good = _pile(tmp_path / "pile")
    out = tmp_path / "out"
    report = preprocess({"pile": str(tmp_path / "pile")}, out, tok, PreprocessSettings(shard_bytes=1), workers=2,
                        log=lambda m: None)
    tokenizer = Tokenizer(out / "tokenizer.model")
    for name in SETS:
        texts = [t for shard in ("s0-00000", "s0-00001") for t in _decoded(tokenizer, out / "pile/train" /
                                                                          set_slug(name) / shard)]
        assert texts == good[name]  # exact round trip, order kept within a set
    assert report["skipped_by_reason"] == {"empty": 1, "invalid_utf8": 1, "malformed_json": 1,
                                           "missing_text": 1, "truncated_zstd": 1}
    assert report["documents_read"] == report["documents_written"] + report["documents_skipped"]
    cut = out / "pile/train/Github/s0-00002"  # whatever zstd could decode ahead of the truncation is kept
    before_cut = len(IndexedDataset(str(cut))) if cut.with_suffix(".idx").exists() else 0
    assert before_cut < 40
    assert report["reconciled"] and report["documents_written"] == 24 + 40 + before_cut
    by_file = report["skipped_by_file"]
    assert by_file[str(tmp_path / "pile/train/02.jsonl.zst")] == {"truncated_zstd": 1}
    manifest = json.loads((out / "pile/manifests/train-s0-00000.json").read_text())
    assert manifest["tokenizer_sha256"] == tokenizer.sha256
    assert manifest["sources"][0]["bytes"] == (tmp_path / "pile/train/00.jsonl.zst").stat().st_size
    assert len(manifest["sources"][0]["sha256"]) == 64
    assert {o["set"] for o in manifest["outputs"]} == {set_slug(s) for s in SETS}


def test_pile_set_selection_and_validation_split(tmp_path: Path, tok: Path) -> None:
    _pile(tmp_path / "pile")
    report = preprocess({"pile": str(tmp_path / "pile")}, tmp_path / "out", tok,
                        PreprocessSettings(pile_sets=("Github",)), workers=1, log=lambda m: None)
    assert set(report["tokens_by_set"]) == {"pile/train/Github", "pile/validation/Github"}
    assert report["skipped_by_reason"]["set_not_selected"] == 16
    assert report["reconciled"]


def test_pg19_books_are_chunked_and_missing_metadata_is_a_warning(tmp_path: Path, tok: Path) -> None:
    books = {"train": [prose(i, 3000) for i in range(3)], "validation": [prose(50, 300)]}
    root = make_pg19(tmp_path / "pg19", books)
    (root / "metadata.csv").unlink()
    out = tmp_path / "out"
    report = preprocess({"pg19": str(root)}, out, tok, PreprocessSettings(max_doc_chars=4000), log=lambda m: None)
    chunks = _decoded(Tokenizer(out / "tokenizer.model"), out / "pg19/train/pg19/s0-00000")
    assert len(chunks) > 3 and all(len(c) <= 4000 for c in chunks)
    assert "".join(chunks) == "".join(b.strip() for b in books["train"])  # header/footer stripped, nothing lost
    assert report["documents_by_set"]["pg19/train/pg19"] == 3
    assert report["warnings"] == {str(root / "metadata.csv"): "missing_metadata"}
    assert report["reconciled"]


def test_chunks_cut_at_paragraphs_and_keep_every_character() -> None:
    text = "".join(f"para {i} " + "word " * 30 + "\n\n" for i in range(20))
    chunks = list(_chunks(text, 500))
    assert "".join(chunks) == text and all(len(c) <= 500 for c in chunks)
    assert all(c.endswith("\n\n") for c in chunks[:-1])
    assert list(_chunks("x" * 1200, 500)) == ["x" * 500, "x" * 500, "x" * 200]


def test_rerun_skips_finished_shards_and_rebuilds_a_lost_one(tmp_path: Path, tok: Path) -> None:
    texts = tmp_path / "txt"
    texts.mkdir()
    for i in range(6):
        (texts / f"{i}.txt").write_text(prose(i, 200))
    inputs = {"txt": str(texts / "*.txt")}
    settings = PreprocessSettings(shard_bytes=2500, val_fraction=0.0)
    first = preprocess(inputs, tmp_path / "out", tok, settings, log=lambda m: None)
    assert first["units_built"] >= 3
    bins = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*.bin")}
    again = preprocess(inputs, tmp_path / "out", tok, settings, log=lambda m: None)
    assert again["units_built"] == 0 and again["units_skipped_finished"] == first["units_built"]
    (tmp_path / "out/txt/manifests/train-s0-00001.json").unlink()  # as if killed before the manifest
    third = preprocess(inputs, tmp_path / "out", tok, settings, log=lambda m: None)
    assert third["units_built"] == 1 and third["tokens"] == first["tokens"]
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*.bin")} == bins  # deterministic rebuild


def test_other_tokenizer_and_bad_inputs_are_refused(tmp_path: Path, tok: Path) -> None:
    (tmp_path / "a.txt").write_text(prose(1))
    preprocess({"a": str(tmp_path / "a.txt")}, tmp_path / "out", tok, log=lambda m: None)
    other = train_tokenizer([prose(i) for i in range(50)], tmp_path / "other", 300, 10**6)
    with pytest.raises(DataError, match="holds shards built with tokenizer .* expected a new output folder"):
        preprocess({"a": str(tmp_path / "a.txt")}, tmp_path / "out", other, log=lambda m: None)
    with pytest.raises(DataError, match="must look like NAME=SPEC"):
        parse_inputs(["nonsense"])
    with pytest.raises(DataError, match="matched no files"):
        plan_units({"x": str(tmp_path / "missing/*.jsonl.zst")}, PreprocessSettings())


def test_hf_datasets_source_reads_local_files_like_the_native_reader(tmp_path: Path, tok: Path) -> None:
    records = [{"text": prose(i), "meta": {"pile_set_name": SETS[i % 3]}} for i in range(9)]
    write_jsonl_zst(tmp_path / "hf" / "a.jsonl.zst", records)
    native = preprocess({"x": str(tmp_path / "hf/a.jsonl.zst")}, tmp_path / "native", tok, log=lambda m: None)
    hf = preprocess({"x": f"hf:{tmp_path}/hf/*.jsonl.zst"}, tmp_path / "viahf", tok, log=lambda m: None)
    assert hf["tokens_by_set"] == native["tokens_by_set"]
    a = sorted(p.relative_to(tmp_path / "native") for p in (tmp_path / "native").rglob("*.bin"))
    b = sorted(p.relative_to(tmp_path / "viahf") for p in (tmp_path / "viahf").rglob("*.bin"))
    assert a == b
    for rel in a:
        assert np.array_equal(np.fromfile(tmp_path / "native" / rel, np.uint16),
                              np.fromfile(tmp_path / "viahf" / rel, np.uint16))
