"""Where documents come from: each `data.path` spec becomes a `Source` that yields one `str` per document.

Readers stream in bounded memory, whatever the input: a zstd shard is decompressed a few dozen bytes of
input at a time, so no single read expands past ~2 MiB (an 8 KB bomb once became one 256 MiB piece);
lines are split in time linear in their length, and one longer than `max_line_bytes` is dropped as it
arrives; `.txt` files are read in pieces. Bad records are skipped with a count per file and named reason
(invalid_utf8, malformed_json, deep_nesting, missing_text, non_string_text, empty, lone_surrogate,
line_too_long, set_not_selected) instead of failing a multi-hour job on one broken line; a file that
cannot be read at all (unreadable, corrupt_zstd, truncated_zstd) raises a `DataError`, or with
``on_bad_file = "skip"`` (what preprocessing sets) is counted as one skipped record. A spec that matches
nothing or holds no usable text fails loudly.
"""

from __future__ import annotations

import codecs
import glob
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import zstandard

from hybrid_pretrain.data_pipeline.documents import Document, SkipCounter, Source, text_problem
from hybrid_pretrain.data_pipeline.embedded import DEFAULT_MAX_BYTES, build_embedded_corpus, embedded_corpus_name
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.hf import HFSource
from hybrid_pretrain.data_pipeline.pieces import join_lines

SPLITS = ("train", "validation", "test")
JSONL_SUFFIXES = (".jsonl.zst", ".jsonl")
TEXT_SUFFIXES = (".txt",)
EXPECTED = (
    "expected .jsonl.zst files/globs, a PG-19 folder (train|validation|test/<id>.txt + metadata.csv), "
    "a Pile folder (train/*.jsonl.zst + val.jsonl.zst), .txt files or hf:<local files or hub:name>"
)
_READ_BYTES = 1 << 20
_MAX_ZSTD_WINDOW = 2**31  # accept `zstd --long` files; decoders refuse windows over 128 MiB by default
# Compressed bytes per decompress call. A zstd block yields at most 128 KiB from 4 input bytes (an RLE
# block), so 64 bytes in give at most ~2 MiB out; measured ~115 MB/s of output, above tokenizing speed.
_ZSTD_FEED = 64
DEFAULT_MAX_LINE_BYTES = 64 << 20  # a JSON-lines record longer than this is skipped as "line_too_long"
_TEXT_PIECE_CHARS = 1 << 20  # .txt files are read in pieces of about this many characters, cut at line ends

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
    """Decompressed bytes of a (possibly multi-frame) zstd file, at most ~2 MiB per piece (see _ZSTD_FEED).

    Done by hand rather than with `stream_reader` because that ends silently on a truncated file, and a
    half-downloaded shard must not pass for a small one.
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW)
    frame, fed = dctx.decompressobj(), False
    while chunk := fh.read(_READ_BYTES):
        view = memoryview(chunk)
        for start in range(0, len(view), _ZSTD_FEED):
            piece = view[start : start + _ZSTD_FEED]
            while piece:
                out = frame.decompress(piece)
                fed = True
                if out:
                    yield out
                piece = b""
                if frame.eof:  # the next frame starts in the leftover input (at most _ZSTD_FEED bytes)
                    piece = frame.unused_data
                    frame, fed = dctx.decompressobj(), False
    if fed and not frame.eof:
        raise DataError(f"{path}: zstd stream ends mid-frame; the file is truncated (re-download it)")


def _lines(blocks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """The newline-separated lines of a byte stream, in time linear in its length; None for a line longer
    than `max_bytes`, whose bytes are dropped as they arrive (memory stays bounded by `max_bytes`)."""
    pending: list[bytes] = []  # the current line's pieces so far, joined once when it ends
    size, too_long = 0, False
    for block in blocks:
        *ended, rest = bytes(block).split(b"\n")
        for i, piece in enumerate(ended):
            if i == 0 and (pending or too_long):  # ends the line that earlier blocks started
                size += len(piece)
                yield None if too_long or size > max_bytes else b"".join([*pending, piece])
                pending, size, too_long = [], 0, False
            else:
                yield piece if len(piece) <= max_bytes else None
        if rest and not too_long:
            size += len(rest)
            if size > max_bytes:
                pending, too_long = [], True
            else:
                pending.append(rest)
    if too_long:
        yield None
    elif pending:
        yield b"".join(pending)


def _parse_record(line: bytes, keep: frozenset[str] | None) -> tuple[Document | None, str | None]:
    """One JSON line -> (Document, None), or (None, the reason it is skipped)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except RecursionError:  # valid JSON nested deeper than the parser's stack
        return None, "deep_nesting"
    except ValueError:
        return None, "malformed_json"
    if not isinstance(record, dict) or "text" not in record:
        return None, "missing_text"
    problem = text_problem(record["text"])
    if problem:
        return None, problem
    meta = record.get("meta")
    set_name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    set_name = set_name if isinstance(set_name, str) and text_problem(set_name) is None else None
    if keep is not None and set_name not in keep:
        return None, "set_not_selected"
    return Document(record["text"], set_name), None


def _bad_file(path: Path, skips: SkipCounter, reason: str, message: str, on_bad_file: str) -> None:
    """A file that cannot be read (on): raise DataError, or count it as one skipped record and warn."""
    if on_bad_file != "skip":
        raise DataError(message)
    skips.count_read(path)
    skips.add(path, reason)
    skips.warnings[str(path)] = message


def read_jsonl_documents(
    path: Path, skips: SkipCounter, sets: Iterable[str] | None = None, on_bad_file: str = "raise",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[Document]:
    """Stream Pile-style JSON lines (`.jsonl.zst` decompressed on the fly) as Documents.

    `sets` keeps only records whose `meta.pile_set_name` is listed (others count as "set_not_selected").
    `on_bad_file="skip"` keeps the records before a truncated or corrupt zstd stream ends (or none of an
    unreadable file) and counts the file as one skipped record ("truncated_zstd", "corrupt_zstd",
    "unreadable"), so one bad shard cannot kill a long preprocessing job; the default raises, because
    silently training on half a shard is worse when nobody reads a report.
    """
    keep = frozenset(sets) if sets is not None else None
    try:
        with open(path, "rb") as fh:
            blocks = _zstd_blocks(fh, path) if path.name.endswith(".zst") else iter(lambda: fh.read(_READ_BYTES), b"")
            for line in _lines(blocks, max_line_bytes):
                if line is not None and not line.strip():
                    continue
                skips.count_read(path)
                doc, reason = (None, "line_too_long") if line is None else _parse_record(line, keep)
                if doc is None:
                    skips.add(path, reason)
                else:
                    yield doc
    except zstandard.ZstdError as e:
        _bad_file(path, skips, "corrupt_zstd", f"{path}: not a valid zstd stream ({e}); expected a "
                  "zstandard-compressed .jsonl", on_bad_file)
    except DataError as e:  # _zstd_blocks: the stream ends mid-frame
        _bad_file(path, skips, "truncated_zstd", str(e), on_bad_file)
    except OSError as e:
        _bad_file(path, skips, "unreadable", f"{path}: cannot be read ({e.strerror or e}); check the file and its "
                  "permissions", on_bad_file)


def read_jsonl(path: Path, skips: SkipCounter) -> Iterator[str]:
    """Stream the "text" field of a Pile-style JSON-lines file (`.jsonl.zst` decompressed on the fly)."""
    for doc in read_jsonl_documents(path, skips):
        yield doc.text


def _utf8_problem(path: Path) -> str | None:
    """Whether the whole file decodes as UTF-8, checked in blocks before any of it is used: None, or why not."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(_READ_BYTES):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not_utf8"
    return None


def _text_pieces(fh: io.TextIOBase) -> Iterator[str]:
    """A text file in pieces of about _TEXT_PIECE_CHARS characters ending at line ends (longer lines cut hard)."""
    return join_lines(iter(lambda: fh.readline(_TEXT_PIECE_CHARS), ""), _TEXT_PIECE_CHARS)


def _without_gutenberg(pieces: Iterator[str]) -> Iterator[str]:
    """`strip_gutenberg` over a stream of pieces. A file of one piece gets exactly strip_gutenberg; a longer
    one has its start marker looked for in the first piece (the licence header is a few KB) and stops at
    the end marker; when only an end marker exists, its leading whitespace is kept."""
    first = next(pieces, None)
    second = next(pieces, None)
    if first is None:
        return
    if second is None:
        yield strip_gutenberg(first)
        return
    start = _PG_START.search(first)
    strip = start is not None
    held, gap = None, []  # the last piece with text, not yet given out, and whitespace-only pieces after it
    for piece in itertools.chain([first[start.end():] if start else first, second], pieces):
        end = _PG_END.search(piece)
        if end:
            piece, strip = piece[: end.start()], True
        if piece.strip():
            if held is None and strip:
                piece = piece.lstrip()
            if held is not None:
                yield held
                yield from gap
            held, gap = piece, []
        elif held is not None:
            gap.append(piece)
        elif not strip:
            yield piece  # leading whitespace of a book without markers stays
        if end:
            break
    if held is not None:
        yield held.rstrip() if strip else "".join([held, *gap])


def read_text(path: Path, skips: SkipCounter, on_bad_file: str = "raise") -> Iterator[str]:
    """A text file as one document, in pieces of a few MB (joined, they are the whole text), without
    Project Gutenberg boilerplate.

    Stripping applies to every `.txt`, not only PG-19 folders: the markers are specific enough never to
    occur in other text, and a book passed as a lone file should read the same as inside a folder. A file
    that is not UTF-8 is skipped ("not_utf8") before any of it is given out; one that cannot be opened
    raises DataError, or with `on_bad_file="skip"` is skipped ("unreadable").
    """
    try:
        problem = _utf8_problem(path)
    except OSError as e:
        _bad_file(path, skips, "unreadable", f"{path}: cannot be read ({e.strerror or e}); check the file and its "
                  "permissions", on_bad_file)
        return
    skips.count_read(path)
    if problem:
        skips.add(path, problem)
        return
    empty = True
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for piece in _without_gutenberg(_text_pieces(fh)):
                empty = empty and not piece.strip()
                if not empty:
                    yield piece
    except OSError as e:  # it was readable a moment ago; part of it may be out already, so never skip silently
        raise DataError(f"{path}: reading failed midway ({e.strerror or e}); check the file and rerun") from e
    if empty:
        skips.add(path, "empty")


class JsonlSource(Source):
    """Pile-style `.jsonl.zst` (or plain `.jsonl`) files, read in the given order.

    `sets` (Pile `meta.pile_set_name` values) keeps only those sets; None keeps all.
    """

    kind = "jsonl"
    on_bad_file = "raise"  # the preprocessing CLI sets "skip" and reports the file instead
    max_line_bytes = DEFAULT_MAX_LINE_BYTES

    def __init__(self, spec: str, paths: list[Path]) -> None:
        super().__init__(spec)
        self.paths = paths
        self.sets: frozenset[str] | None = None

    def files(self, split: str | None = None) -> list[Path]:
        return list(self.paths)

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        for path in files:
            yield from read_jsonl_documents(path, self.skips, self.sets, self.on_bad_file, self.max_line_bytes)


def _text_documents(paths: list[Path], skips: SkipCounter, on_bad_file: str) -> Iterator[Document]:
    """One document per file, streamed as pieces (Document.continues marks all but the first)."""
    for path in paths:
        for i, piece in enumerate(read_text(path, skips, on_bad_file)):
            yield Document(piece, continues=i > 0)


class TextSource(Source):
    """Plain `.txt` files, one document each."""

    kind = "text"
    on_bad_file = "raise"

    def __init__(self, spec: str, paths: list[Path]) -> None:
        super().__init__(spec)
        self.paths = paths

    def files(self, split: str | None = None) -> list[Path]:
        return list(self.paths)

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        yield from _text_documents(files, self.skips, self.on_bad_file)


class PG19Source(Source):
    """A PG-19-style folder: `<root>/{train,validation,test}/<id>.txt` books.

    `metadata.csv` only describes the books, so a missing one is recorded as a warning, not an error.
    """

    kind = "pg19"
    on_bad_file = "raise"

    def __init__(self, spec: str, root: Path) -> None:
        super().__init__(spec, tuple(s for s in SPLITS if _has_txt(root / s)))
        self.root = root
        if not (root / "metadata.csv").is_file():
            self.skips.warnings[str(root / "metadata.csv")] = "missing_metadata"

    def files(self, split: str | None = None) -> list[Path]:
        splits = self.splits if split is None else (split,)
        return [p for s in splits for p in sorted((self.root / s).glob("*.txt"))]

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        yield from _text_documents(files, self.skips, self.on_bad_file)


class PileFolderSource(Source):
    """A Pile-style folder: `<root>/train/*.jsonl.zst` shards plus `val.jsonl.zst` / `test.jsonl.zst`."""

    kind = "pile"
    _SPLIT_FILES = {"validation": "val.jsonl.zst", "test": "test.jsonl.zst"}
    on_bad_file = "raise"
    max_line_bytes = DEFAULT_MAX_LINE_BYTES

    def __init__(self, spec: str, root: Path) -> None:
        splits = ("train",) + tuple(s for s, f in self._SPLIT_FILES.items() if (root / f).is_file())
        super().__init__(spec, splits)
        self.root = root
        self.sets: frozenset[str] | None = None

    def files(self, split: str | None = None) -> list[Path]:
        splits = self.splits if split is None else (split,)
        out: list[Path] = []
        for s in splits:
            shards = [self.root / self._SPLIT_FILES[s]] if s in self._SPLIT_FILES else None
            out += shards or sorted(self.root.glob("train/*.jsonl.zst"))
        return out

    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        for path in files:
            yield from read_jsonl_documents(path, self.skips, self.sets, self.on_bad_file, self.max_line_bytes)


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
