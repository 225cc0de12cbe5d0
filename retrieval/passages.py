"""Passage store: documents cut into ~100-word passages with stable ids, text on disk and memory-mapped.

Layout of a store folder (written to a temporary folder and renamed, so a crash never leaves half a store):

    passages.jsonl   one JSON object per passage: {"id", "source", "doc", "offset", "text"}
    offsets.npy      int64 (n + 1,) byte offsets of each line in passages.jsonl
    ids.npy          int64 (n,) passage ids, row order
    digests.npy      uint64 (n,) first 8 bytes of each passage text's blake2b (detects edited passages)
    meta.json        words per passage, passage and document counts, the sources read

Ids are a hash of (source spec, document index, word offset), not a running counter: a counter shifts
every later id when a document is added or removed upstream, which would force re-embedding the whole
corpus; a hash keeps every untouched passage's id, so an incremental refresh only touches what changed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hybrid_pretrain.data_pipeline.sources import parse_sources
from hybrid_pretrain.retrieval.config import WORDS_PER_PASSAGE
from hybrid_pretrain.retrieval.errors import PassageError

_WORD = re.compile(r"\S+")
_ID_MASK = (1 << 63) - 1  # FAISS ids are signed int64 and -1 means "no result"


@dataclass(frozen=True)
class Passage:
    id: int
    source: str
    doc: int
    offset: int  # index of the passage's first word in its document
    text: str


def passage_id(source: str, doc: int, offset: int) -> int:
    """Stable non-negative int64 id of the passage starting at word `offset` of document `doc` of `source`."""
    h = hashlib.blake2b(f"{source}\x00{doc}\x00{offset}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & _ID_MASK


def text_digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def split_passages(doc: str, words: int = WORDS_PER_PASSAGE) -> Iterator[tuple[int, str]]:
    """(word offset, text) of consecutive `words`-word spans of `doc`, original spacing and newlines kept."""
    spans = [m.span() for m in _WORD.finditer(doc)]
    for i in range(0, len(spans), words):
        chunk = spans[i : i + words]
        yield i, doc[chunk[0][0] : chunk[-1][1]]


def iter_source_documents(data_path: str, split: str = "train", cache_dir: Path | None = None) -> Iterator[
    tuple[str, int, str]
]:
    """(source spec, document index within that source, text) for every document of `split` in `data_path`."""
    for source in parse_sources(data_path, cache_dir):
        if split in source.splits:
            for i, doc in enumerate(source.documents(split)):
                yield source.spec, i, doc


def write_store(
    out_dir: str | Path,
    documents: Iterable[tuple[str, int, str]],
    words: int = WORDS_PER_PASSAGE,
    max_passages: int | None = None,
    progress: bool = True,
) -> PassageStore:
    """Split `documents` ((source, doc index, text) triples) into passages and write a store at `out_dir`."""
    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    offsets, ids, digests, sources = [0], [], [], []
    n_docs = 0
    bar = tqdm(desc="passages", unit=" passages", disable=not progress)
    with open(tmp / "passages.jsonl", "wb") as fh:
        for source, doc, text in documents:
            if max_passages is not None and len(ids) >= max_passages:
                break
            if source not in sources:
                sources.append(source)
            n_docs += 1
            for offset, ptext in split_passages(text, words):
                if max_passages is not None and len(ids) >= max_passages:
                    break
                pid = passage_id(source, doc, offset)
                line = json.dumps({"id": pid, "source": source, "doc": doc, "offset": offset, "text": ptext})
                fh.write(line.encode() + b"\n")
                offsets.append(fh.tell())
                ids.append(pid)
                digests.append(text_digest(ptext))
                bar.update(1)
    bar.close()
    if not ids:
        shutil.rmtree(tmp)
        raise PassageError(f"passage store {out}: the documents gave no passages; expected non-empty text")
    id_arr = np.asarray(ids, dtype=np.int64)
    if len(np.unique(id_arr)) != len(id_arr):  # 63-bit hashes: ~1e-2 chance at a billion passages, so check
        shutil.rmtree(tmp)
        raise PassageError(f"passage store {out}: passage id collision; change a source spec and rebuild")
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(tmp / "ids.npy", id_arr)
    np.save(tmp / "digests.npy", np.asarray(digests, dtype=np.uint64))
    meta = {"words_per_passage": words, "passages": len(ids), "documents": n_docs, "sources": sources}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return PassageStore(out)


def build_passage_store(
    data_path: str,
    out_dir: str | Path,
    split: str = "train",
    cache_dir: Path | None = None,
    words: int = WORDS_PER_PASSAGE,
    max_passages: int | None = None,
    progress: bool = True,
) -> PassageStore:
    """Passage store of every document in a `data.path` spec (empty: the embedded corpus, built in `cache_dir`)."""
    docs = iter_source_documents(data_path, split, cache_dir)
    return write_store(out_dir, docs, words, max_passages, progress)


class PassageStore:
    """Read side of a store: `len`, `store[row]`, `store.text(row)`, `store.by_ids(ids)`; text is read via mmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        for name in ("passages.jsonl", "offsets.npy", "ids.npy", "digests.npy", "meta.json"):
            if not (self.path / name).is_file():
                raise PassageError(f"passage store {self.path}: missing {name}; expected a folder from write_store")
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        self.ids = np.load(self.path / "ids.npy", mmap_mode="r")
        self.digests = np.load(self.path / "digests.npy", mmap_mode="r")
        if len(self.offsets) != len(self.ids) + 1:
            raise PassageError(f"passage store {self.path}: offsets.npy and ids.npy disagree on the passage count")
        self._order = np.argsort(self.ids, kind="stable")  # rows sorted by id, for id -> row lookups
        self._sorted_ids = np.asarray(self.ids)[self._order]
        fh = open(self.path / "passages.jsonl", "rb")
        self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        fh.close()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int) -> Passage:
        if not 0 <= row < len(self):
            raise IndexError(f"passage row {row} out of range for a store of {len(self)}")
        rec = json.loads(self._mm[int(self.offsets[row]) : int(self.offsets[row + 1])])
        return Passage(rec["id"], rec["source"], rec["doc"], rec["offset"], rec["text"])

    def text(self, row: int) -> str:
        return self[row].text

    def texts(self, rows: Iterable[int]) -> list[str]:
        return [self[int(r)].text for r in rows]

    def rows_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id; -1 for ids the store does not hold (e.g. FAISS's -1 padding)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.clip(pos, 0, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._order[pos], -1)

    def by_ids(self, ids: Sequence[int] | np.ndarray) -> list[Passage | None]:
        return [self[int(r)] if r >= 0 else None for r in self.rows_of(ids)]

    def close(self) -> None:
        self._mm.close()


def diff_passages(indexed_ids: np.ndarray, indexed_digests: np.ndarray, new: PassageStore) -> tuple[
    np.ndarray, np.ndarray
]:
    """(ids to remove, rows of `new` to embed and add) to turn an index of `indexed_ids` into one of `new`.

    A passage whose id survives but whose text changed (digest differs) is both removed and re-added.
    """
    indexed_ids = np.asarray(indexed_ids, dtype=np.int64)
    order = np.argsort(indexed_ids)
    new_ids = np.asarray(new.ids)
    pos = np.clip(np.searchsorted(indexed_ids[order], new_ids), 0, max(len(order) - 1, 0))
    kept = (indexed_ids[order][pos] == new_ids) if len(order) else np.zeros(len(new_ids), bool)
    changed = kept.copy()
    changed[kept] = np.asarray(indexed_digests)[order][pos[kept]] != np.asarray(new.digests)[kept]
    gone = indexed_ids[new.rows_of(indexed_ids) < 0]
    return np.concatenate([gone, new_ids[changed]]), np.flatnonzero(~kept | changed)
