"""The embedded default corpus: standard-library sources as a deterministic Pile-style "Github" shard."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import zstandard

from hybrid_pretrain.data_pipeline.documents import SkipCounter
from hybrid_pretrain.data_pipeline.embedded import build_embedded_corpus, stdlib_root, stdlib_sources
from hybrid_pretrain.data_pipeline.sources import EmbeddedSource, parse_sources, read_jsonl
from hybrid_pretrain.tests.data_pipeline import corpora


@pytest.fixture
def small_embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpora.small_embedded(tmp_path_factory)


def test_stdlib_sources_exclude_installed_packages_and_put_tests_last() -> None:
    root = stdlib_root()
    files = stdlib_sources()
    parts = [p.relative_to(root).parts for p in files]
    assert files and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in ps or "dist-packages" in ps for ps in parts)
    is_test = [bool({"test", "tests", "idle_test"} & set(ps[:-1])) for ps in parts]
    assert is_test == sorted(is_test)  # library code first


def test_build_is_deterministic_capped_and_pile_shaped(tmp_path: Path) -> None:
    a = build_embedded_corpus(tmp_path / "a", max_bytes=200_000)
    b = build_embedded_corpus(tmp_path / "b", max_bytes=200_000)
    assert a.read_bytes() == b.read_bytes()
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(a.read_bytes()).decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["meta"]["pile_set_name"] for r in records} == {"Github"}
    texts = [r["text"] for r in records]
    assert 150_000 < sum(len(t.encode()) for t in texts) <= 200_000
    assert all(t.strip() for t in texts)
    for text in texts[:5]:
        ast.parse(text)  # real Python source


def test_build_is_cached(tmp_path: Path) -> None:
    path = build_embedded_corpus(tmp_path, max_bytes=50_000)
    mtime = path.stat().st_mtime_ns
    assert build_embedded_corpus(tmp_path, max_bytes=50_000) == path
    assert path.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp*"))


def test_empty_path_means_embedded_corpus(small_embedded: Path) -> None:
    (source,) = parse_sources("", cache_dir=small_embedded.parent)
    assert isinstance(source, EmbeddedSource) and source.splits == ("train",)
    assert source.fingerprint() == [source.name]  # not the cache file's mtime
    assert len(list(read_jsonl(small_embedded, SkipCounter()))) > 10
