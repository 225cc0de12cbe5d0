"""What every document source yields and counts: `Document`, `SkipCounter` and the `Source` base class.

Kept apart from the concrete readers (``sources.py``) so the Hugging Face source (``hf.py``) and the
file readers share them without importing each other.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from hybrid_pretrain.data_pipeline.errors import DataError


class Document(NamedTuple):
    """One document's text (or the next piece of it) and the set it belongs to (Pile `meta.pile_set_name`).

    A streamed `.txt` file is one document read in pieces: every piece after the first has `continues`
    set, so readers never hold a whole book and consumers that need whole documents join the pieces.
    """

    text: str
    set_name: str | None = None
    continues: bool = False


def text_problem(text: object) -> str | None:
    """Why `text` cannot be a document, as a skip reason, or None.

    A lone surrogate (``"\\ud800"`` in JSON is valid) cannot be encoded as UTF-8, which the tokenizer and
    every hash need: it would abort a whole job, so such a record is skipped instead.
    """
    if not isinstance(text, str):
        return "non_string_text"
    if not text.strip():
        return "empty"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "lone_surrogate"
    return None


class SkipCounter:
    """Documents read and dropped, per file and reason, so bad input is reported rather than silently lost.

    Readers count every record they meet in `read`, so a report can reconcile read = written + skipped.
    """

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.read: Counter[str] = Counter()
        self.warnings: dict[str, str] = {}  # file -> problem that dropped no document (e.g. no metadata.csv)

    def add(self, file: str | Path, reason: str) -> None:
        self.counts[(str(file), reason)] += 1

    def count_read(self, file: str | Path, n: int = 1) -> None:
        self.read[str(file)] += n

    def update(self, other: SkipCounter) -> None:
        self.counts.update(other.counts)
        self.read.update(other.read)
        self.warnings.update(other.warnings)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self.counts.items():
            out[reason] += n
        return dict(sorted(out.items()))

    def by_file(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (file, reason), n in sorted(self.counts.items()):
            out.setdefault(file, {})[reason] = n
        return out

    def summary(self) -> str:
        if not self.counts:
            return "none skipped"
        return f"{self.total} skipped (" + ", ".join(f"{r}: {n}" for r, n in self.by_reason().items()) + ")"


class Source(abc.ABC):
    """One `data.path` spec: knows its native splits and yields documents for one of them.

    Sources without a native split report `splits == ("train",)`: everything is training text and the
    caller holds out validation documents itself.
    """

    kind = "source"

    def __init__(self, spec: str, splits: tuple[str, ...] = ("train",)) -> None:
        self.spec = spec
        self.splits = splits
        self.skips = SkipCounter()

    def documents(self, split: str = "train") -> Iterator[str]:
        """Non-empty whole documents of `split` (a streamed document's pieces joined); DataError if it holds none."""
        parts: list[str] = []
        for doc in self.records(split):
            if parts and not doc.continues:
                yield "".join(parts)
                parts = []
            parts.append(doc.text)
        if parts:
            yield "".join(parts)

    def records(self, split: str = "train", files: list[Path] | None = None) -> Iterator[Document]:
        """Documents of `split` with their set names (only from `files`, a subset of `files(split)`, if given);
        a streamed document comes as pieces (see Document.continues).

        DataError if the split turns out to hold no usable document.
        """
        if split not in self.splits:
            raise DataError(f"data.path spec '{self.spec}' has no '{split}' split (it has: {', '.join(self.splits)})")
        count = 0
        for doc in self._records(split, self.files(split) if files is None else files):
            count += 1
            yield doc
        if count == 0 and files is None:
            raise DataError(
                f"data.path spec '{self.spec}' holds no non-empty documents in its '{split}' split "
                f"({self.skips.summary()}); expected UTF-8 text"
            )

    @abc.abstractmethod
    def files(self, split: str | None = None) -> list[Path]:
        """Files read for `split` (all splits when None), in reading order."""

    def fingerprint(self) -> list:
        """Identity of the input for caching: every file's path, size and modification time."""
        out = []
        for path in self.files():
            st = path.stat()
            out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        return out

    def describe(self) -> str:
        return f"{self.kind} '{self.spec}' ({len(self.files())} files, splits: {', '.join(self.splits)})"

    @abc.abstractmethod
    def _records(self, split: str, files: list[Path]) -> Iterator[Document]:
        """Documents of `split` read from `files`, skips counted in `self.skips`."""
