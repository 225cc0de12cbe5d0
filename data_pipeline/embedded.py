"""The embedded default corpus: the running interpreter's standard-library sources as a Pile "Github" set.

Every Python installation carries a few tens of MB of well-written code, so the quick start trains on
real text without downloading anything. It is materialised once as a Pile-style `.jsonl.zst` file so
that it goes through exactly the reader real corpora use.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

import zstandard

PILE_SET_NAME = "Github"
DEFAULT_MAX_BYTES = 12_000_000  # enough for a debug model to learn something, small enough to tokenise in seconds
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """Standard-library `.py` files in a deterministic order: library code first, then test suites.

    Library code comes first so a small cap yields idiomatic code rather than mostly test fixtures.
    """
    root = root or stdlib_root()
    library, tests = [], []
    for path in root.rglob("*.py"):
        dirs = path.relative_to(root).parts[:-1]
        if _SKIP_DIRS.intersection(dirs):
            continue
        (tests if _TEST_DIRS.intersection(dirs) else library).append(path)
    key = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    return sorted(library, key=key) + sorted(tests, key=key)


def embedded_corpus_name(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """File name that identifies the corpus content: interpreter build and cap."""
    version = ".".join(map(str, sys.version_info[:3]))
    return f"stdlib-{platform.python_implementation().lower()}{version}-{max_bytes}.jsonl.zst"


def build_embedded_corpus(cache_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Write the stdlib corpus to `cache_dir` once (temp file + rename) and return its path.

    Files are taken whole, in `stdlib_sources` order, while they fit in `max_bytes` of UTF-8
    text; empty and non-UTF-8 files are left out. The same interpreter always gives the same bytes.
    """
    cache_dir = Path(cache_dir)
    out = cache_dir / embedded_corpus_name(max_bytes)
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    total = 0
    try:
        with open(tmp, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh) as writer:
            for path in stdlib_sources():
                if total + path.stat().st_size > max_bytes:
                    continue  # a smaller file later may still fit
                raw = path.read_bytes()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if not text.strip():
                    continue
                total += len(raw)
                line = json.dumps({"text": text, "meta": {"pile_set_name": PILE_SET_NAME}}, ensure_ascii=False)
                writer.write(line.encode("utf-8") + b"\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
