"""Bad input is skipped and counted, never fatal, and read in bounded memory (issue 19 item 4).

Each case once aborted a whole preprocess_data.py job (and its rerun) or took memory or time out of
proportion to its size: a lone surrogate, deep nesting, non-string text, an over-long line, a
decompression bomb, an unreadable file, a huge .txt.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from hybrid_pretrain.data_pipeline import sources
from hybrid_pretrain.data_pipeline.documents import SkipCounter
from hybrid_pretrain.data_pipeline.preprocess import PreprocessSettings, Unit, preprocess, process_unit
from hybrid_pretrain.data_pipeline.sources import _lines, _zstd_blocks, read_jsonl_documents, read_text, strip_gutenberg
from hybrid_pretrain.tests.data_pipeline.corpora import PG_FOOTER, PG_HEADER, prose, small_tokenizer, write_jsonl_zst

MiB = 1 << 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tokenizer(tmp_path_factory)


def _bomb(path: Path, size: int, byte: bytes = b"a") -> Path:
    """`size` bytes of one repeated byte and no newline: a few KB compressed, one endless line decompressed."""
    cctx = zstandard.ZstdCompressor(level=3)
    with path.open("wb") as f, cctx.stream_writer(f) as w:
        for _ in range(size // MiB):
            w.write(byte * MiB)
    return path


def _hostile_pile(root: Path) -> list[str]:
    """A shard mixing good records with every kind of bad one; returns the good texts."""
    good = [prose(i, 40) for i in range(4)]
    lines = [json.dumps(r).encode() for r in (
        {"text": good[0]},
        {"text": "half a surrogate \ud800 here"},  # valid JSON ("\\ud800"), not encodable as UTF-8
        {"text": 42},
        {"text": ["a", "list"]},
        {"text": None},
        {"text": good[1]},
        {"text": "y" * 10_000},  # longer than the configured maximum below
        {"text": good[2], "meta": {"pile_set_name": "\udcff"}},  # a bad set name is dropped, the text kept
        {"text": good[3]},
    )]
    lines.insert(2, b'{"text": "x", "deep": ' + b"[" * 1900 + b"]" * 1900 + b"}")  # nested past the parser's stack
    lines.insert(4, b'{"text": "caf\xe9"}')  # invalid UTF-8 on disk
    root.mkdir(parents=True)
    (root / "mixed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    _bomb(root / "bomb.jsonl.zst", 32 * MiB)
    (root / "corrupt.jsonl.zst").write_bytes(b"not zstd at all" * 10)
    full = write_jsonl_zst(root / "cut.jsonl.zst", [{"text": prose(50 + i)} for i in range(20)]).read_bytes()
    (root / "cut.jsonl.zst").write_bytes(full[: len(full) // 2])
    return good


def test_every_bad_record_is_a_named_reason_and_the_report_reconciles(tmp_path: Path, tok: Path) -> None:
    good = _hostile_pile(tmp_path / "in")
    (tmp_path / "in" / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    settings = PreprocessSettings(max_line_bytes=4096, val_fraction=0.0)
    report = preprocess({"p": str(tmp_path / "in" / "*.jsonl.zst"), "t": str(tmp_path / "in" / "*.txt")},
                        tmp_path / "out", tok, settings, log=lambda m: None)
    reasons = report["skipped_by_reason"]
    assert reasons["lone_surrogate"] == 1 and reasons["deep_nesting"] == 1 and reasons["non_string_text"] == 3
    assert reasons["line_too_long"] == 2  # the 10 kB record and the 32 MiB bomb line
    assert reasons["invalid_utf8"] == 1 and reasons["corrupt_zstd"] == 1 and reasons["truncated_zstd"] == 1
    assert reasons["not_utf8"] == 1
    assert report["reconciled"] and report["documents_read"] == report["documents_written"] + report[
        "documents_skipped"]
    assert report["documents_written"] >= len(good)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped_by_reason"] == reasons
    assert "not a valid zstd stream" in report["warnings"][str(tmp_path / "in" / "corrupt.jsonl.zst")]


def test_an_unreadable_file_is_counted_not_fatal(tmp_path: Path, tok: Path) -> None:
    write_jsonl_zst(tmp_path / "a.jsonl.zst", [{"text": prose(1)}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.model").write_bytes(tok.read_bytes())
    gone = tmp_path / "gone.jsonl.zst"  # listed when the job was planned, deleted (or unreadable) when read
    unit = Unit("x", str(tmp_path / "*.jsonl.zst"), 0, "train", "s0-00000", (str(tmp_path / "a.jsonl.zst"), str(gone)))
    manifest = process_unit(unit, str(tmp_path / "out"), PreprocessSettings(val_fraction=0.0))
    assert manifest["skipped_by_file"] == {str(gone): {"unreadable": 1}}
    assert manifest["documents_written"] == 1 and manifest["reconciled"]
    skips = SkipCounter()
    assert list(read_text(tmp_path / "gone.txt", skips, on_bad_file="skip")) == []
    assert skips.by_reason() == {"unreadable": 1} and sum(skips.read.values()) == 1


def test_a_decompression_bomb_comes_out_in_bounded_pieces_and_memory(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.jsonl.zst", 64 * MiB)
    assert bomb.stat().st_size < 64 * 1024
    with bomb.open("rb") as fh:
        assert max(len(block) for block in _zstd_blocks(fh, bomb)) <= 4 * MiB  # was one 64 MiB piece
    skips = SkipCounter()
    tracemalloc.start()
    try:
        assert list(read_jsonl_documents(bomb, skips, max_line_bytes=MiB)) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert skips.by_reason() == {"line_too_long": 1}
    assert peak < 16 * MiB, peak


def test_line_splitting_is_linear_and_bounded(tmp_path: Path) -> None:
    """A 64 MiB line arriving in 16 KiB blocks: the old splitter copied the pending line for every block
    (4096 copies of up to 64 MiB); this one keeps the pieces and joins them once."""
    block = b"z" * (16 * 1024)
    blocks = [block] * 4096 + [b"\nnext line\n"]
    lines = list(_lines(iter(blocks), max_bytes=128 * MiB))
    assert [len(x) for x in lines] == [64 * MiB, 9, 0] or [len(x) for x in lines] == [64 * MiB, 9]
    cut = list(_lines(iter(blocks), max_bytes=MiB))
    assert cut[0] is None and cut[1] == b"next line"
    text = b"a\nbb\n\nccc\n" * 1000
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]  # lines split across blocks anywhere
    assert list(_lines(iter(pieces))) == text.split(b"\n")[:-1]


@pytest.mark.parametrize("header", [True, False])
def test_txt_is_streamed_in_pieces_that_join_to_the_whole_text(tmp_path: Path, monkeypatch, header: bool) -> None:
    body = "".join(prose(i, 120) + "\n" for i in range(40))
    text = (PG_HEADER.format(title="T") + body + PG_FOOTER.format(title="T")) if header else "\ufeff" + body
    path = tmp_path / "book.txt"
    path.write_text(text.replace("\n", "\r\n"))
    expected = strip_gutenberg(path.read_text(encoding="utf-8-sig"))
    monkeypatch.setattr(sources, "_TEXT_PIECE_CHARS", 500)
    pieces = list(read_text(path, SkipCounter()))
    assert len(pieces) > 10 and max(len(p) for p in pieces) < 1500
    assert "".join(pieces) == expected
    (source,) = sources.parse_sources(str(path))
    assert list(source.documents()) == [expected]  # consumers that need whole documents get the joined text


def test_a_huge_txt_is_read_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    line = ("word " * 20 + "\n").encode()
    with path.open("wb") as f:
        for _ in range(48 * MiB // (1000 * len(line))):
            f.write(line * 1000)
    tracemalloc.start()
    try:
        n = sum(len(piece) for piece in read_text(path, SkipCounter()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n > 40 * MiB and peak < 12 * MiB, peak  # the old reader held the file twice (bytes and str)


def test_a_streamed_txt_is_one_document_in_the_report(tmp_path: Path, tok: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "_TEXT_PIECE_CHARS", 300)
    (tmp_path / "a.txt").write_text("".join(prose(i, 60) + "\n" for i in range(10)))
    report = preprocess({"t": str(tmp_path / "a.txt")}, tmp_path / "out", tok, PreprocessSettings(val_fraction=0.0),
                        log=lambda m: None)
    assert report["documents_read"] == report["documents_written"] == 1 and report["reconciled"]
    assert report["documents_by_set"] == {"t/train/t": 1}
