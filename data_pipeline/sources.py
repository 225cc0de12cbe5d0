"""Where documents come from: each `data.path` spec becomes a `Source` that yields one `str` per document.

Readers stream (a Pile shard is never decompressed whole into memory), skip bad records with a count
per file and reason instead of failing a multi-hour job on one broken line, and fail loudly with a
`DataError` when a spec matches nothing or holds no usable text.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import zstandard

from hybrid_pretrain.data_pipeline.documents import Document, SkipCounter, Source
from hybrid_pretrain.data_pipeline.embedded import DEFAULT_MAX_BYTES, build_embedded_corpus, embedded_corpus_name
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.hf import HFSource

SPLITS = ("train", "validation", "test")
JSONL_SUFFIXES = (".jsonl.zst", ".jsonl")
TEXT_SUFFIXES = (".txt",)
EXPECTED = (
    "expected .jsonl.zst files/globs, a PG-19 folder (train|validation|test/<id>.txt + metadata.csv), "
    "a Pile folder (train/*.jsonl.zst + val.jsonl.zst), .txt files or hf:<local files or hub:name>"
)
_READ_BYTES = 1 << 20
_MAX_ZSTD_WINDOW = 2**31  # accept `zstd --long` files; decoders refuse windows over 128 MiB by default

_PG_START = re.compile(
    r"^(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG[^\n]*|\*END\*THE SMALL PRINT[^\n]*)\n?", re.I | re.M
)
_PG_END = re.compile(r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg licence header and footer when their markers are present.

    The boilerplate is identical across tens of thousands of books, so leaving it in teaches the model
    a licence by heart and leaks it into every validation book.
    """
    start = _PG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() if (start or end) else text


def _zstd_blocks(fh: io.BufferedIOBase, path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-frame) zstd file, a bounded piece at a time.

    Done by hand rather than with `stream_reader` because that ends silently on a truncated file, and a
    half-downloaded shard must not pass for a small one.
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW)
    frame, fed = dctx.decompressobj(), False
    while chunk := fh.read(_READ_BYTES):
        while chunk:
            out = frame.decompress(chunk)
            fed = True
            if out:
                yield out
            chunk = b""
            if frame.eof:  # the next frame starts in the leftover input
                chunk = frame.unused_data
                frame, fed = dctx.decompressobj(), False
    if fed and not frame.eof:
        raise DataError(f"{path}: zstd stream ends mid-frame; the file is truncated (re-download it)")


def _lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    pending = b""
    for block in blocks:
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def read_jsonl_documents(
    path: Path, skips: SkipCounter, sets: Iterable[str] | None = None, on_truncated: str = "raise"
) -> Iterator[Document]:
    """Stream Pile-style JSON lines (`.jsonl.zst` decompressed on the fly) as Documents.

    `sets` keeps only records whose `meta.pile_set_name` is listed (others count as "set_not_selected").
    `on_truncated="skip"` keeps the records before a truncated zstd stream ends and counts the cut-off
    line as "truncated_zstd", so one half-downloaded shard cannot kill a long preprocessing job; the
    default raises, because silently training on half a shard is worse when nobody reads a report.
    """
    keep = frozenset(sets) if sets is not None else None
    with open(path, "rb") as fh:
        blocks = _zstd_blocks(fh, path) if path.name.endswith(".zst") else iter(lambda: fh.read(_READ_BYTES), b"")
        try:
            for line in _lines(blocks):
                if not line.strip():
                    continue
                skips.count_read(path)
                try:
                    line_text = line.decode("utf-8")
                except UnicodeDecodeError:
                    skips.add(path, "invalid_utf8")
                    continue
                try:
                    record = json.loads(line_text)
                except ValueError:
                    skips.add(path, "malformed_json")
                    continue
                text = record.get("text") if isinstance(record, dict) else None
                meta = record.get("meta") if isinstance(record, dict) else None
                set_name = meta.get("pile_set_name") if isinstance(meta, dict) else None
                set_name = set_name if isinstance(set_name, str) else None
                if not isinstance(text, str):
                    skips.add(path, "missing_text")
                elif not text.strip():
                    skips.add(path, "empty")
                elif keep is not None and set_name not in keep:
                    skips.add(path, "set_not_selected")
                else:
                    yield Document(text, set_name)
        except zstandard.ZstdError as e:
            raise DataError(f"{path}: not a valid zstd stream ({e}); expected a zstandard-compressed .jsonl") from e
        except DataError:
            if on_truncated != "skip":
                raise
            skips.count_read(path)
            skips.add(path, "truncated_zstd")


def read_jsonl(path: Path, skips: SkipCounter) -> Iterator[str]:
    """Stream the "text" field of a Pile-style JSON-lines file (`.jsonl.zst` decompressed on the fly)."""
    for doc in read_jsonl_documents(path, skips):
        yield doc.text


def read_text(path: Path, skips: SkipCounter) -> Iterator[str]:
    """Yield a whole text file as one document, without Project Gutenberg boilerplate.

    Stripping applies to every `.txt`, not only PG-19 folders: the markers are specific enough never to
    occur in other text, and a book passed as a lone file should read the same as inside a folder.
    """
    skips.count_read(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        skips.add(path, "not_utf8")
        return
    text = strip_gutenberg(text)
    if text.strip():
        yield text
    else:
        skips.add(path, "empty")


class JsonlSource(Source):
    """Pile-style `.jsonl.zst` (or plain `.jsonl`) files, read in the given order.

    `sets` (Pile `meta.pile_set_name` values) keeps only those sets; None keeps all.
    """

    kind = "jsonl"
    on_truncated = "raise"  # the preprocessing CLI sets "skip" and reports the file instead

    def __init__(self, spec: str, paths: list[Path]) -> None:
        super().__init__(spec)
        self.paths = paths
        self.sets: frozenset[str] | None = None

    def files(self, split: str | None = None) -> list[Path]:
        return list(self.paths)

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        for path in files:
            yield from read_jsonl_documents(path, self.skips, self.sets, self.on_truncated)


class TextSource(Source):
    """Plain `.txt` files, one document each."""

    kind = "text"

    def __init__(self, spec: str, paths: list[Path]) -> None:
        super().__init__(spec)
        self.paths = paths

    def files(self, split: str | None = None) -> list[Path]:
        return list(self.paths)

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        for path in files:
            yield from (Document(text) for text in read_text(path, self.skips))


class PG19Source(Source):
    """A PG-19-style folder: `<root>/{train,validation,test}/<id>.txt` books.

    `metadata.csv` only describes the books, so a missing one is recorded as a warning, not an error.
    """

    kind = "pg19"

    def __init__(self, spec: str, root: Path) -> None:
        super().__init__(spec, tuple(s for s in SPLITS if _has_txt(root / s)))
        self.root = root
        if not (root / "metadata.csv").is_file():
            self.skips.warnings[str(root / "metadata.csv")] = "missing_metadata"

    def files(self, split: str | None = None) -> list[Path]:
        splits = self.splits if split is None else (split,)
        return [p for s in splits for p in sorted((self.root / s).glob("*.txt"))]

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        for path in files:
            yield from (Document(text) for text in read_text(path, self.skips))


class PileFolderSource(Source):
    """A Pile-style folder: `<root>/train/*.jsonl.zst` shards plus `val.jsonl.zst` / `test.jsonl.zst`."""

    kind = "pile"
    _SPLIT_FILES = {"validation": "val.jsonl.zst", "test": "test.jsonl.zst"}

    def __init__(self, spec: str, root: Path) -> None:
        splits = ("train",) + tuple(s for s, f in self._SPLIT_FILES.items() if (root / f).is_file())
        super().__init__(spec, splits)
        self.root = root
        self.sets: frozenset[str] | None = None
        self.on_truncated = "raise"

    def files(self, split: str | None = None) -> list[Path]:
        splits = self.splits if split is None else (split,)
        out: list[Path] = []
        for s in splits:
            shards = [self.root / self._SPLIT_FILES[s]] if s in self._SPLIT_FILES else None
            out += shards or sorted(self.root.glob("train/*.jsonl.zst"))
        return out

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        for path in files:
            yield from read_jsonl_documents(path, self.skips, self.sets, self.on_truncated)


class EmbeddedSource(JsonlSource):
    """The default corpus (standard-library sources), materialised under `cache_dir` on first use."""

    kind = "embedded"

    def __init__(self, cache_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.name = embedded_corpus_name(max_bytes)
        super().__init__("<embedded stdlib corpus>", [build_embedded_corpus(Path(cache_dir), max_bytes)])

    def fingerprint(self) -> list:
        return [self.name]  # the name pins interpreter version and cap; the cached file's mtime does not matter


def _has_txt(folder: Path) -> bool:
    return folder.is_dir() and next(folder.glob("*.txt"), None) is not None


def _is_pg19(root: Path) -> bool:
    return any(_has_txt(root / s) for s in SPLITS)


def _is_pile_folder(root: Path) -> bool:
    return (root / "train").is_dir() and next((root / "train").glob("*.jsonl.zst"), None) is not None


def _parse_spec(spec: str) -> list[Source]:
    if spec.startswith("hf:"):
        return [HFSource(spec)]
    path = Path(os.path.expandvars(os.path.expanduser(spec)))
    if path.is_dir():
        if _is_pg19(path):
            return [PG19Source(spec, path)]
        if _is_pile_folder(path):
            return [PileFolderSource(spec, path)]
        raise DataError(f"data.path '{spec}' is a folder without a PG-19 or Pile layout; {EXPECTED}")
    if any(c in spec for c in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    else:
        matches = [path] if path.is_file() else []
    if not matches:
        raise DataError(f"data.path '{spec}' matched no files; {EXPECTED}")
    jsonl = [p for p in matches if p.name.endswith(JSONL_SUFFIXES)]
    text = [p for p in matches if p.name.endswith(TEXT_SUFFIXES)]
    other = [p for p in matches if p not in jsonl and p not in text]
    if other:
        raise DataError(f"data.path '{spec}' matched unsupported file '{other[0]}'; {EXPECTED}")
    return ([JsonlSource(spec, jsonl)] if jsonl else []) + ([TextSource(spec, text)] if text else [])


def parse_sources(path: str, cache_dir: Path | None = None) -> list[Source]:
    """Turn a comma-separated `data.path` into sources, failing at once on a spec that matches nothing.

    An empty `path` means the embedded standard-library corpus, which is built under `cache_dir`.
    """
    specs = [s.strip() for s in path.split(",") if s.strip()]
    if not specs:
        if cache_dir is None:
            raise DataError("data.path is empty (embedded corpus) but no cache directory was given to build it in")
        return [EmbeddedSource(Path(cache_dir))]
    return [source for spec in specs for source in _parse_spec(spec)]


def resolve_sources(path: str, split: str = "train", cache_dir: Path | None = None) -> Iterator[str]:
    """All documents of `split` from the sources in `path`, source by source, in a deterministic order.

    Specs are resolved eagerly, so a typo fails here rather than after the first source has been read.
    Sources without that split contribute nothing; DataError if none has it.
    """
    sources = parse_sources(path, cache_dir)
    having = [s for s in sources if split in s.splits]
    if not having:
        raise DataError(f"no source in data.path '{path}' has a '{split}' split")
    return itertools.chain.from_iterable(s.documents(split) for s in having)
