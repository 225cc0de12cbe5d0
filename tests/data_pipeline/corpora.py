"""Small generated corpora shared by the data-pipeline tests (everything lives in tmp directories).

A plain module rather than conftest.py: pytest registers every conftest.py as the module `conftest`,
and other test folders import their helpers under that name.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import zstandard

from hybrid_pretrain.data_pipeline.documents import SkipCounter
from hybrid_pretrain.data_pipeline.embedded import build_embedded_corpus
from hybrid_pretrain.data_pipeline.sources import read_jsonl
from hybrid_pretrain.data_pipeline.tokenizer import train_tokenizer

PG_HEADER = (
    "The Project Gutenberg eBook of {title}\n\nThis eBook is for the use of anyone anywhere.\n\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK {title} ***\n\n\n"
)
PG_FOOTER = "\n\n*** END OF THE PROJECT GUTENBERG EBOOK {title} ***\n\nSection 1. General Terms of Use\n"
WORDS = (
    "the whale sea captain ship sailed across grey water under a pale moon while sailors sang "
    "old songs of home and harbour light wind rope mast deck storm quiet morning"
).split()


def prose(seed: int, n_words: int = 200) -> str:
    """Deterministic English-like text with line breaks, distinct per seed."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + f" {seed}." for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


def write_jsonl_zst(path: Path, records: list) -> Path:
    """Write records (dicts, or raw str lines for malformed input) as a zstd-compressed JSON-lines file."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return path


def make_pg19(root: Path, books: dict[str, list[str]], header: bool = True) -> Path:
    """A PG-19-style folder; `books` maps a split to its texts, which get PG boilerplate when `header`."""
    rows = ["id,title,author,year_or_unknown,source"]
    for split, texts in books.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            book_id = f"{split[0]}{i}"
            title = f"BOOK {book_id.upper()}"
            body = PG_HEADER.format(title=title) + text + PG_FOOTER.format(title=title) if header else text
            (root / split / f"{book_id}.txt").write_text(body)
            rows.append(f"{book_id},{title},Anon,1900,test")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


_session_cache: dict[str, object] = {}


def small_embedded(factory: pytest.TempPathFactory) -> Path:
    """A 400 kB embedded (stdlib) corpus, built once per session: real code for tokenizer tests."""
    if "embedded" not in _session_cache:
        _session_cache["embedded"] = build_embedded_corpus(factory.mktemp("embedded"), max_bytes=400_000)
    return _session_cache["embedded"]


def code_docs(factory: pytest.TempPathFactory) -> list[str]:
    return list(read_jsonl(small_embedded(factory), SkipCounter()))


def small_tokenizer(factory: pytest.TempPathFactory) -> Path:
    """A 512-piece tokenizer trained on `small_embedded`, once per session."""
    if "tokenizer" not in _session_cache:
        out = factory.mktemp("tok") / "tok"
        _session_cache["tokenizer"] = train_tokenizer(code_docs(factory), out, vocab_size=512, sample_bytes=400_000)
    return _session_cache["tokenizer"]


def shared_data_root() -> Path:
    """The staged development corpus (/work/shared/data or $SHARED_DATA); skips the test when absent."""
    root = Path(os.environ.get("SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
    if not (root / "pile_sample").is_dir() or not (root / "pg19_sample").is_dir():
        pytest.skip(f"shared data not found at {root} (set SHARED_DATA)")
    return root
