"""Readers: Pile-style shards, PG-19 folders, text files, spec resolution and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from hybrid_pretrain.data_pipeline.documents import SkipCounter
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.sources import (
    JsonlSource,
    PG19Source,
    PileFolderSource,
    TextSource,
    parse_sources,
    read_jsonl,
    resolve_sources,
    strip_gutenberg,
)
from hybrid_pretrain.tests.data_pipeline.corpora import make_pg19, prose, write_jsonl_zst


def test_jsonl_zst_skips_bad_records_and_counts_them(tmp_path: Path) -> None:
    path = write_jsonl_zst(
        tmp_path / "a.jsonl.zst",
        [
            {"text": "first", "meta": {"pile_set_name": "Github"}},
            '{"text": "broken',
            {"meta": {"pile_set_name": "Github"}},
            {"text": "   \n"},
            ["not", "a", "dict"],
            "",
            {"text": "second"},
            {"text": 42},
        ],
    )
    skips = SkipCounter()
    assert list(read_jsonl(path, skips)) == ["first", "second"]
    assert skips.by_reason() == {"empty": 1, "malformed_json": 1, "missing_text": 2, "non_string_text": 1}
    assert skips.by_file() == {str(path): {"empty": 1, "malformed_json": 1, "missing_text": 2, "non_string_text": 1}}
    assert "5 skipped" in skips.summary()


def test_jsonl_zst_is_streamed_across_frames(tmp_path: Path) -> None:
    docs = [prose(i, 2000) for i in range(30)]
    frames = [zstandard.ZstdCompressor().compress((json.dumps({"text": d}) + "\n").encode()) for d in docs]
    path = tmp_path / "multi.jsonl.zst"
    path.write_bytes(b"".join(frames))  # concatenated frames are a valid zstd file
    reader = read_jsonl(path, SkipCounter())
    assert next(reader) == docs[0]  # a generator: nothing is decompressed past what is consumed
    assert list(reader) == docs[1:]


def test_truncated_or_corrupt_zstd_is_a_data_error(tmp_path: Path) -> None:
    good = write_jsonl_zst(tmp_path / "good.jsonl.zst", [{"text": prose(i)} for i in range(50)])
    good = good.read_bytes()
    truncated = tmp_path / "truncated.jsonl.zst"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated"):
        list(read_jsonl(truncated, SkipCounter()))
    corrupt = tmp_path / "corrupt.jsonl.zst"
    corrupt.write_bytes(b"this is not zstd" * 8)
    with pytest.raises(DataError, match="corrupt.jsonl.zst.*not a valid zstd stream"):
        list(read_jsonl(corrupt, SkipCounter()))


def test_plain_jsonl_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}')  # no trailing newline
    assert list(resolve_sources(str(path))) == ["one", "two"]


@pytest.mark.parametrize(
    "start,end",
    [
        ("*** START OF THE PROJECT GUTENBERG EBOOK X ***", "*** END OF THE PROJECT GUTENBERG EBOOK X ***"),
        ("***START OF THIS PROJECT GUTENBERG EBOOK X***", "***END OF THIS PROJECT GUTENBERG EBOOK X***"),
        ("*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*", "End of Project Gutenberg's X"),
    ],
)
def test_strip_gutenberg_variants(start: str, end: str) -> None:
    text = f"Licence blah\n{start}\n\nCall me Ishmael.\n*****\nThe end.\n{end}\nMore licence\n"
    assert strip_gutenberg(text) == "Call me Ishmael.\n*****\nThe end."


def test_strip_gutenberg_leaves_other_text_alone() -> None:
    text = "  Indented first line\n*** not a marker ***\n"
    assert strip_gutenberg(text) == text


def test_pg19_folder_splits_and_boilerplate(tmp_path: Path) -> None:
    books = {"train": [prose(1), prose(2)], "validation": [prose(3)]}
    root = make_pg19(tmp_path / "pg19", books)
    (source,) = parse_sources(str(root))
    assert isinstance(source, PG19Source)
    assert source.splits == ("train", "validation")  # no test/ folder
    train = list(source.documents("train"))
    assert train == [b.strip() for b in books["train"]]
    assert not any("PROJECT GUTENBERG" in d or "General Terms" in d for d in train)
    assert list(resolve_sources(str(root), "validation")) == [prose(3).strip()]
    with pytest.raises(DataError, match="no 'test' split"):
        list(source.documents("test"))


def test_pg19_book_without_boilerplate_is_kept_whole(tmp_path: Path) -> None:
    root = make_pg19(tmp_path / "pg19", {"train": [prose(5)]}, header=False)
    assert list(resolve_sources(str(root))) == [prose(5)]


def test_pile_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "pile"
    write_jsonl_zst(root / "train" / "00.jsonl.zst", [{"text": "a"}, {"text": "b"}])
    write_jsonl_zst(root / "train" / "01.jsonl.zst", [{"text": "c"}])
    write_jsonl_zst(root / "val.jsonl.zst", [{"text": "v"}])
    (source,) = parse_sources(str(root))
    assert isinstance(source, PileFolderSource) and source.splits == ("train", "validation")
    assert list(source.documents("train")) == ["a", "b", "c"]
    assert list(source.documents("validation")) == ["v"]


def test_text_files_globs_and_comma_lists_keep_order(tmp_path: Path) -> None:
    for name, text in [("b.txt", "bee"), ("a.txt", "ay"), ("empty.txt", " \n")]:
        (tmp_path / name).write_text(text)
    write_jsonl_zst(tmp_path / "s" / "x.jsonl.zst", [{"text": "jay"}])
    spec = f"{tmp_path}/*.txt, {tmp_path}/s/*.jsonl.zst"
    sources = parse_sources(spec)
    assert [type(s) for s in sources] == [TextSource, JsonlSource]
    assert [d for s in sources for d in s.documents()] == ["ay", "bee", "jay"]  # globs are sorted
    assert sources[0].skips.by_reason() == {"empty": 1}
    assert list(resolve_sources(spec)) == ["ay", "bee", "jay"]


def test_spec_matching_nothing_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.path '.*nope/\*.jsonl.zst' matched no files; expected .jsonl.zst"):
        resolve_sources(f"{tmp_path}/nope/*.jsonl.zst")
    with pytest.raises(DataError, match="missing.txt' matched no files"):
        parse_sources(f"{tmp_path}/missing.txt")


def test_unusable_specs_name_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir' is a folder without a PG-19 or Pile layout"):
        parse_sources(str(tmp_path / "empty_dir"))
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unsupported file .*data.parquet"):
        parse_sources(str(tmp_path / "data.parquet"))
    with pytest.raises(DataError, match="needs a cache directory|no cache directory"):
        parse_sources("")


def test_corpus_without_usable_documents_names_the_spec(tmp_path: Path) -> None:
    path = write_jsonl_zst(tmp_path / "bad.jsonl.zst", [{"text": ""}, "{oops", {"title": "no text"}])
    with pytest.raises(DataError, match=r"bad.jsonl.zst' holds no non-empty documents .*3 skipped"):
        list(resolve_sources(str(path)))
    with pytest.raises(DataError, match="has a 'validation' split"):
        resolve_sources(str(path), "validation")


def test_non_utf8_text_file_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "b.txt").write_text("fine")
    (source,) = parse_sources(f"{tmp_path}/*.txt")
    assert list(source.documents()) == ["fine"]
    assert source.skips.by_reason() == {"not_utf8": 1}


def test_pg19_empty_split_folder_is_not_a_split(tmp_path: Path) -> None:
    root = make_pg19(tmp_path / "pg19", {"train": [prose(1)]})
    (root / "validation").mkdir()
    (source,) = parse_sources(str(root))
    assert source.splits == ("train",)
