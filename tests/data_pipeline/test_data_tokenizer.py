"""SentencePiece training and the Tokenizer wrapper: ids, round trips, determinism, small-corpus handling."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.tokenizer import MARKERS, Tokenizer, tokenizer_sample, train_tokenizer
from hybrid_pretrain.tests.data_pipeline import corpora
from hybrid_pretrain.tests.data_pipeline.corpora import prose


@pytest.fixture
def code_docs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return corpora.code_docs(tmp_path_factory)


@pytest.fixture
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpora.small_tokenizer(tmp_path_factory)


def test_special_ids_and_markers(tokenizer_model: Path) -> None:
    tok = Tokenizer(tokenizer_model)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512
    assert list(tok.marker_ids) == list(MARKERS)
    for marker, i in tok.marker_ids.items():
        assert i >= 4 and tok.encode(marker) == [i]
    assert tok.sha256 == hashlib.sha256(tokenizer_model.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x  # comment\n\n\tif  x:\n",
        "  leading and trailing spaces  ",
        "unicode: caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 \u00a0nbsp",
        "<query> what is <passage> text </retrieved>",
        "",
    ],
)
def test_round_trip_is_exact(tokenizer_model: Path, text: str) -> None:
    tok = Tokenizer(tokenizer_model)
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # byte fallback covers any character
    assert tok.decode(ids) == text


def test_round_trip_on_code_and_batch_encode(tokenizer_model: Path, code_docs: list[str]) -> None:
    tok = Tokenizer(tokenizer_model)
    batch = tok.encode_batch(code_docs[:20])
    assert batch == [tok.encode(d) for d in code_docs[:20]]
    assert [tok.decode(ids) for ids in batch] == code_docs[:20]


def test_training_is_deterministic(tmp_path: Path, code_docs: list[str]) -> None:
    a = train_tokenizer(code_docs, tmp_path / "a", vocab_size=400, sample_bytes=100_000)
    b = train_tokenizer(iter(code_docs), tmp_path / "b", vocab_size=400, sample_bytes=100_000)
    assert a.name == "a.model" and a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("*.tmp*"))


def test_sample_is_a_prefix_of_the_stream(code_docs: list[str]) -> None:
    sample = tokenizer_sample(code_docs, 50_000)
    joined = "".join(sample)
    assert "".join(code_docs).startswith(joined)
    assert 50_000 <= len(joined.encode()) < 50_000 + 4 * 4096 + 1


def test_small_corpus_clamps_vocab_with_a_warning(tmp_path: Path) -> None:
    messages: list[str] = []
    path = train_tokenizer([prose(0)], tmp_path / "t", vocab_size=4096, sample_bytes=10**6, log=messages.append)
    tok = Tokenizer(path)
    assert 270 < tok.vocab_size < 4096
    assert len(messages) == 1 and "data.vocab_size=4096 is too large" in messages[0]
    assert tok.decode(tok.encode(prose(0))) == prose(0)


def test_too_small_vocab_and_empty_input_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.vocab_size=100 is too small: this corpus needs at least"):
        train_tokenizer([prose(0)], tmp_path / "t", vocab_size=100, sample_bytes=10**6)
    with pytest.raises(DataError, match="no text to train on"):
        train_tokenizer([], tmp_path / "t", vocab_size=300, sample_bytes=10**6)


def test_loading_a_bad_model_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a SentencePiece .model"):
        Tokenizer(tmp_path / "junk.model")
