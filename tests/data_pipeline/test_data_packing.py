"""prepare_data (cache, splits, EOS packing, atomic writes), PreparedData and PackedSequences."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_pretrain.data_pipeline import packing
from hybrid_pretrain.data_pipeline.config import DataConfig
from hybrid_pretrain.data_pipeline.dataset import PackedSequences
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.packing import PreparedData, _held_out, prepare_data
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.tests.data_pipeline import corpora
from hybrid_pretrain.tests.data_pipeline.corpora import make_pg19, prose, write_jsonl_zst


@pytest.fixture
def docs() -> list[str]:
    return [prose(i) for i in range(40)]


@pytest.fixture
def jsonl_corpus(tmp_path: Path, docs: list[str]) -> Path:
    records = [{"text": d, "meta": {"pile_set_name": "Test"}} for d in docs]
    return write_jsonl_zst(tmp_path / "corpus" / "00.jsonl.zst", records)


@pytest.fixture
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpora.small_tokenizer(tmp_path_factory)


def make_cfg(path: Path | str, **overrides) -> DataConfig:
    fields = dict(path=str(path), seq_len=32, vocab_size=320, tokenizer_sample_bytes=100_000, val_fraction=0.25)
    return DataConfig(**{**fields, **overrides})


def split_at_eos(tokens: np.ndarray, tok: Tokenizer) -> tuple[list[str], np.ndarray]:
    """Decoded documents of a packed stream, and whatever follows the last EOS."""
    docs, start = [], 0
    for end in np.flatnonzero(tokens == tok.eos_id):
        docs.append(tok.decode(tokens[start:end]))
        start = end + 1
    return docs, tokens[start:]


def no_work(*args, **kwargs):
    raise AssertionError("a cached prepare_data must not train or tokenize")


def test_prepare_writes_eos_separated_documents_and_meta(tmp_path: Path, jsonl_corpus: Path, docs: list[str]) -> None:
    out = prepare_data(make_cfg(jsonl_corpus), tmp_path / "data", log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    data = PreparedData.load(out)
    tokens = {s: np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")}
    train_docs, rest = split_at_eos(tokens["train"], data.tokenizer)
    val_docs, val_rest = split_at_eos(tokens["val"], data.tokenizer)
    assert len(rest) == 0 and len(val_rest) == 0  # every document ends with EOS
    assert train_docs == [d for d in docs if not _held_out(d, 0.25)]  # corpus order kept
    assert val_docs == [d for d in docs if _held_out(d, 0.25)]
    assert 0 < len(val_docs) < len(docs)
    meta = data.meta
    assert meta["dtype"] == "uint16" and meta["val"]["formed_by"] == "held_out"
    assert meta["train"]["tokens"] == len(tokens["train"]) and meta["val"]["documents"] == len(val_docs)
    assert meta["documents_read"] == len(docs) and meta["documents_skipped"] == 0
    assert meta["tokenizer"]["sha256"] == data.tokenizer.sha256 and meta["tokenizer"]["trained"]
    assert data.vocab_size == data.tokenizer.vocab_size <= 320


def test_second_call_is_cached_and_does_no_work(
    tmp_path: Path, jsonl_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(jsonl_corpus)
    out = prepare_data(cfg, tmp_path / "data", log=lambda m: None)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(packing, "train_tokenizer", no_work)
    monkeypatch.setattr(Tokenizer, "encode_batch", no_work)
    logs: list[str] = []
    assert prepare_data(cfg, out, log=logs.append) == out
    assert len(logs) == 1 and "using cached" in logs[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


@pytest.mark.parametrize(
    "change", [{"vocab_size": 300}, {"val_fraction": 0.5}, {"seq_len": 16}, {"max_corpus_bytes": 9000}]
)
def test_config_change_rebuilds(tmp_path: Path, jsonl_corpus: Path, change: dict) -> None:
    out = prepare_data(make_cfg(jsonl_corpus), tmp_path / "data", log=lambda m: None)
    before = json.loads((out / "meta.json").read_text())
    logs: list[str] = []
    prepare_data(make_cfg(jsonl_corpus, **change), out, log=logs.append)
    after = json.loads((out / "meta.json").read_text())
    assert not any("using cached" in m for m in logs)
    assert after["fingerprint"] != before["fingerprint"]
    if "max_corpus_bytes" in change:
        assert 9000 <= after["bytes_read"] < before["bytes_read"]


def test_changed_input_file_rebuilds(tmp_path: Path, jsonl_corpus: Path) -> None:
    cfg = make_cfg(jsonl_corpus)
    out = prepare_data(cfg, tmp_path / "data", log=lambda m: None)
    write_jsonl_zst(jsonl_corpus, [{"text": prose(i + 100)} for i in range(30)])
    prepare_data(cfg, out, log=lambda m: None)
    assert PreparedData.load(out).meta["documents_read"] == 30


def test_interrupted_build_leaves_nothing_that_looks_finished(
    tmp_path: Path, jsonl_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = prepare_data(make_cfg(jsonl_corpus), tmp_path / "data", log=lambda m: None)
    calls = []
    original = Tokenizer.encode_batch

    def interrupted(self, texts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, texts)

    monkeypatch.setattr(packing, "ENCODE_BATCH_BYTES", 5000)
    monkeypatch.setattr(Tokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(make_cfg(jsonl_corpus, val_fraction=0.3), out, log=lambda m: None)
    assert not (out / "meta.json").exists()
    assert not list(out.glob("*.tmp*"))
    with pytest.raises(DataError, match="no meta.json; run prepare_data first"):
        PreparedData.load(out)
    monkeypatch.undo()
    prepare_data(make_cfg(jsonl_corpus, val_fraction=0.3), out, log=lambda m: None)
    assert PreparedData.load(out).meta["inputs"]["config"]["val_fraction"] == 0.3


def test_pg19_validation_split_is_used(tmp_path: Path) -> None:
    books = {"train": [prose(i, 600) for i in range(6)], "validation": [prose(50, 600), prose(51)]}
    root = make_pg19(tmp_path / "pg19", books)
    out = prepare_data(make_cfg(root, val_fraction=0.5), tmp_path / "data", log=lambda m: None)
    data = PreparedData.load(out)
    val_docs, _ = split_at_eos(np.asarray(data.val.tokens), data.tokenizer)
    train_docs, _ = split_at_eos(np.asarray(data.train.tokens), data.tokenizer)
    assert val_docs == [b.strip() for b in books["validation"]]
    assert train_docs == [b.strip() for b in books["train"]]  # no hash hold-out from a split source
    assert data.meta["val"]["formed_by"] == "held_out"


def test_single_document_corpus_cuts_validation_from_the_end(tmp_path: Path, tokenizer_model: Path) -> None:
    text = prose(7, 3000)
    (tmp_path / "book.txt").write_text(text)
    cfg = make_cfg(tmp_path / "book.txt", tokenizer=str(tokenizer_model), val_fraction=0.1)
    data = PreparedData.load(prepare_data(cfg, tmp_path / "data", log=lambda m: None))
    ids = data.tokenizer.encode(text) + [data.tokenizer.eos_id]
    stream = np.concatenate([np.asarray(data.train.tokens), np.asarray(data.val.tokens)])
    assert stream.tolist() == ids  # nothing lost or duplicated
    assert data.meta["val"]["formed_by"] == "train_tail"
    assert data.meta["val"]["tokens"] == max(33, -(-len(ids) // 10))
    assert len(data.val) >= 1


def test_whole_trailing_document_moves_to_validation(tmp_path: Path, tokenizer_model: Path) -> None:
    big, small = prose(1, 3000), prose(2, 60)
    (tmp_path / "a.txt").write_text(big)
    (tmp_path / "b.txt").write_text(small)
    n_small = len(Tokenizer(tokenizer_model).encode(small)) + 1
    # validation needs seq_len + 1 tokens; the last document holds a few more, so it moves whole
    cfg = make_cfg(f"{tmp_path}/*.txt", tokenizer=str(tokenizer_model), val_fraction=0.0, seq_len=n_small - 5)
    data = PreparedData.load(prepare_data(cfg, tmp_path / "data", log=lambda m: None))
    tok = data.tokenizer
    assert np.asarray(data.val.tokens).tolist() == tok.encode(small) + [tok.eos_id]
    assert data.meta["train"]["documents"] == 1 and data.meta["val"]["documents"] == 1


def test_given_tokenizer_is_copied_not_trained(
    tmp_path: Path, jsonl_corpus: Path, tokenizer_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packing, "train_tokenizer", no_work)
    out = prepare_data(make_cfg(jsonl_corpus, tokenizer=str(tokenizer_model)), tmp_path / "data", log=lambda m: None)
    assert (out / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
    assert PreparedData.load(out).meta["tokenizer"]["trained"] is False


def test_too_small_corpus_and_bad_config_are_data_errors(tmp_path: Path, tokenizer_model: Path) -> None:
    (tmp_path / "tiny.txt").write_text("hello world")
    with pytest.raises(DataError, match=r"corpus too small for data.seq_len=32: \d+ tokens"):
        prepare_data(make_cfg(tmp_path / "tiny.txt", tokenizer=str(tokenizer_model)), tmp_path / "d", log=print)
    with pytest.raises(DataError, match="data.val_fraction must be in"):
        prepare_data(make_cfg(tmp_path / "tiny.txt", val_fraction=1.0), tmp_path / "d")
    with pytest.raises(DataError, match="matched no files"):
        prepare_data(make_cfg(tmp_path / "nothing*.jsonl.zst"), tmp_path / "d")
    with pytest.raises(DataError, match="data.tokenizer .* does not exist"):
        prepare_data(make_cfg(tmp_path / "tiny.txt", tokenizer=str(tmp_path / "x.model")), tmp_path / "d")


def test_load_detects_tampering_and_takes_a_seq_len(tmp_path: Path, jsonl_corpus: Path) -> None:
    out = prepare_data(make_cfg(jsonl_corpus), tmp_path / "data", log=lambda m: None)
    data = PreparedData.load(out, seq_len=16)
    assert data.train.seq_len == 16 and len(data.train) == (data.train.num_tokens - 1) // 16
    with open(out / "train.bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(DataError, match="train.bin' holds .* tokens but meta.json says"):
        PreparedData.load(out)


def test_packed_sequences_layout(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    ds = PackedSequences(path, seq_len=10)
    assert len(ds) == 9  # (100 - 1) // 10: each sample needs one token beyond its inputs
    assert ds[0].tolist() == list(range(11)) and ds[8].tolist() == list(range(80, 91))
    assert ds[0].dtype == torch.int64 and torch.equal(ds[-1], ds[8])
    inputs, labels = ds[3][:-1], ds[3][1:]
    assert torch.equal(labels, inputs + 1)
    with pytest.raises(IndexError):
        ds[9]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a picklable dataset
    assert torch.equal(clone[5], ds[5])


def test_packed_sequences_uint32_and_too_short(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    np.array([70_000, 1, 2, 99_999], dtype=np.uint32).tofile(path)
    assert PackedSequences(path, 3, np.uint32)[0].tolist() == [70_000, 1, 2, 99_999]
    with pytest.raises(DataError, match=r"corpus too small for data.seq_len=4: .* holds 4 tokens"):
        PackedSequences(path, 4, np.uint32)


def test_embedded_default_corpus_end_to_end(tmp_path: Path) -> None:
    cfg = DataConfig(seq_len=64, vocab_size=1000, tokenizer_sample_bytes=300_000, max_corpus_bytes=300_000)
    out = prepare_data(cfg, tmp_path / "data", log=lambda m: None)
    data = PreparedData.load(out)
    assert data.meta["inputs"]["sources"][0][0] == "embedded"
    assert list((out / "cache").glob("stdlib-*.jsonl.zst"))
    assert data.vocab_size == 1000 and len(data.train) > 100 and len(data.val) >= 1
    text = data.tokenizer.decode(np.asarray(data.train.tokens[:20_000]))
    assert "def " in text and "import " in text
    logs: list[str] = []
    prepare_data(cfg, out, log=logs.append)
    assert "using cached" in logs[0]


def test_training_split_too_small_is_a_data_error(
    tmp_path: Path, jsonl_corpus: Path, tokenizer_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packing, "_held_out", lambda doc, fraction: True)  # every document to validation
    with pytest.raises(DataError, match="training split has 0 tokens.*lower data.val_fraction"):
        prepare_data(make_cfg(jsonl_corpus, tokenizer=str(tokenizer_model)), tmp_path / "data", log=lambda m: None)
    assert not (tmp_path / "data" / "meta.json").exists() and not list((tmp_path / "data").glob("*.bin*"))
