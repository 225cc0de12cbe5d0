"""Corpus → tokenizer → flat train/val token streams on disk, built once and cached by a fingerprint.

`prepare_data` runs on one rank; everything it leaves behind is read-only afterwards. Files appear
under temporary names and are renamed into place, and `meta.json` is written last, so an interrupted
run never leaves something that looks finished.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hybrid_pretrain.data_pipeline.config import DataConfig
from hybrid_pretrain.data_pipeline.dataset import PackedSequences
from hybrid_pretrain.data_pipeline.documents import SkipCounter, Source
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.sources import parse_sources
from hybrid_pretrain.data_pipeline.tokenizer import MARKERS, TRAIN_SEED, TRAIN_THREADS, Tokenizer, train_tokenizer

FORMAT_VERSION = 1  # bump when the on-disk layout or the split rule changes, to invalidate old caches
TOKENIZER_FILE, TRAIN_FILE, VAL_FILE, META_FILE = "tokenizer.model", "train.bin", "val.bin", "meta.json"
ENCODE_BATCH_BYTES = 4_000_000  # documents handed to SentencePiece's threads at once
# DataConfig fields the prepared files depend on (vocab_size and tokenizer_sample_bytes only when training)
FINGERPRINT_FIELDS = ("path", "seq_len", "tokenizer", "max_corpus_bytes", "val_fraction")


def fingerprint(cfg: DataConfig, sources: list[Source]) -> tuple[str, dict]:
    """Hash of everything the prepared files depend on (config, input files, tokenizer recipe).

    `seq_len` is part of it because validation is topped up to at least one full sequence.
    """
    inputs: dict = {
        "format": FORMAT_VERSION,
        "config": {name: getattr(cfg, name) for name in FINGERPRINT_FIELDS},
        "sources": [[s.kind, s.spec, s.fingerprint()] for s in sources],
    }
    if cfg.tokenizer:
        inputs["tokenizer_sha256"] = Tokenizer(cfg.tokenizer).sha256
    else:
        inputs["config"].update(vocab_size=cfg.vocab_size, tokenizer_sample_bytes=cfg.tokenizer_sample_bytes)
        inputs["tokenizer_recipe"] = {"seed": TRAIN_SEED, "threads": TRAIN_THREADS, "markers": list(MARKERS)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


def _held_out(doc: str, fraction: float) -> bool:
    """Deterministic, order-free hold-out: a document's fate depends only on its text.

    Adding or reordering data never moves a validation document into training, and exact duplicates
    always land on the same side.
    """
    return zlib.crc32(doc.encode("utf-8")) < fraction * 2**32


def _capped(pairs: Iterable[tuple[Source, str]], limit: int) -> Iterator[tuple[Source, str]]:
    """Stop after the document that reaches `limit` UTF-8 bytes (0: no limit)."""
    total = 0
    for source, doc in pairs:
        yield source, doc
        if limit:
            total += len(doc.encode("utf-8"))
            if total >= limit:
                return


def split_documents(sources: list[Source], cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(split, document) pairs in corpus order, split being "train" or "val".

    A source's own validation split is used when it has one; other sources hold out `val_fraction`
    of their documents by hash. `max_corpus_bytes` bounds the training stream and, separately, the
    native validation stream.
    """
    train_stream = ((s, doc) for s in sources for doc in s.documents("train"))
    for source, doc in _capped(train_stream, cfg.max_corpus_bytes):
        held_out = "validation" not in source.splits and _held_out(doc, cfg.val_fraction)
        yield ("val" if held_out else "train"), doc
    val_stream = ((s, doc) for s in sources if "validation" in s.splits for doc in s.documents("validation"))
    for _, doc in _capped(val_stream, cfg.max_corpus_bytes):
        yield "val", doc


def _batches(pairs: Iterable[tuple[str, str]], max_bytes: int) -> Iterator[tuple[list[tuple[str, str]], int]]:
    """Group documents so SentencePiece's threads get enough work per call; yields (batch, UTF-8 bytes)."""
    batch: list[tuple[str, str]] = []
    size = 0
    for pair in pairs:
        batch.append(pair)
        size += len(pair[1].encode("utf-8"))
        if size >= max_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


class _TokenFile:
    """Appends token ids to a temporary file; `commit` renames it into place."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        self.dtype = dtype
        self.fh = open(self.tmp, "wb")
        self.tokens = 0
        self.documents = 0

    def write(self, ids: list[int] | np.ndarray) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.fh)
        self.tokens += len(ids)

    def close(self) -> None:
        self.fh.close()

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def _top_up_validation(train: _TokenFile, val: _TokenFile, doc_starts: array, seq_len: int, val_fraction: float) -> str:
    """Move the end of the training stream into validation when held-out text is missing or too short.

    Validation needs at least one document and `seq_len + 1` tokens (one full sequence). Whole trailing
    documents are moved when they are at most twice what is missing; otherwise (say a single-book
    corpus) just the last tokens are cut off. Returns how validation was formed, for meta.json.
    """
    need = seq_len + 1
    if val.documents and val.tokens >= need:
        return "held_out"
    total = train.tokens + val.tokens
    if total < 2 * need:
        raise DataError(
            f"corpus too small for data.seq_len={seq_len}: {total} tokens in all, expected at least "
            f"2 * (seq_len + 1) = {2 * need} to fill one training and one validation sequence"
        )
    target = min(max(need, math.ceil(val_fraction * total)) - val.tokens, train.tokens - need)
    cut = train.tokens - target
    boundary = bisect.bisect_right(doc_starts, cut) - 1  # last document starting at or before the cut
    if boundary >= 0 and need <= doc_starts[boundary] and train.tokens - doc_starts[boundary] <= 2 * target:
        cut = doc_starts[boundary]
    whole = len(doc_starts) - bisect.bisect_left(doc_starts, cut)  # documents moved entirely
    partial = not (whole and doc_starts[len(doc_starts) - whole] == cut)  # plus the tail of one cut in two
    held_out_docs = val.documents
    train.close()
    tail = np.fromfile(train.tmp, dtype=train.dtype, offset=cut * train.dtype.itemsize)
    os.truncate(train.tmp, cut * train.dtype.itemsize)
    val.write(tail)
    val.documents += whole + partial
    train.documents -= whole
    train.tokens = cut
    return "held_out+train_tail" if held_out_docs else "train_tail"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _cached(out_dir: Path, fp: str) -> dict | None:
    """meta.json if it matches `fp` and the files it describes are intact, else None."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
        if meta.get("fingerprint") != fp:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            if (out_dir / meta[split]["file"]).stat().st_size != meta[split]["tokens"] * itemsize:
                return None
        if Tokenizer(out_dir / TOKENIZER_FILE).sha256 != meta["tokenizer"]["sha256"]:
            return None
        return meta
    except (OSError, ValueError, KeyError, DataError):
        return None


def _tokenizer_for(cfg: DataConfig, sources: list[Source], out_dir: Path, log: Callable[[str], None]) -> Tokenizer:
    """Copy `cfg.tokenizer` into `out_dir`, or train one on the first training documents."""
    if cfg.tokenizer:
        _write_atomic(out_dir / TOKENIZER_FILE, Path(cfg.tokenizer).read_bytes())
    else:
        sample = (doc for split, doc in split_documents(sources, cfg) if split == "train")
        train_tokenizer(
            sample, out_dir / Path(TOKENIZER_FILE).stem, cfg.vocab_size, cfg.tokenizer_sample_bytes, log=log
        )
    tokenizer = Tokenizer(out_dir / TOKENIZER_FILE)
    if tokenizer.eos_id < 0:
        raise DataError(f"data.tokenizer '{cfg.tokenizer}' has no EOS piece; packing needs one between documents")
    return tokenizer


def _pack(cfg: DataConfig, sources: list[Source], tokenizer: Tokenizer, out_dir: Path) -> dict:
    """Tokenise every document, EOS after each, into train.bin / val.bin; returns their statistics."""
    for source in sources:
        source.skips = SkipCounter()  # count each record once: the tokenizer pass may have read some already
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    files = {"train": _TokenFile(out_dir / TRAIN_FILE, dtype), "val": _TokenFile(out_dir / VAL_FILE, dtype)}
    doc_starts = array("q")  # where each training document begins, to move whole documents later
    bytes_read = 0
    try:
        with tqdm(
            desc="tokenizing", unit="B", unit_scale=True, total=cfg.max_corpus_bytes or None, disable=None
        ) as bar:
            for batch, size in _batches(split_documents(sources, cfg), ENCODE_BATCH_BYTES):
                for (split, _), ids in zip(batch, tokenizer.encode_batch([doc for _, doc in batch])):
                    if split == "train":
                        doc_starts.append(files["train"].tokens)
                    ids.append(tokenizer.eos_id)
                    files[split].write(ids)
                    files[split].documents += 1
                bytes_read += size
                bar.update(size)
        formed_by = _top_up_validation(files["train"], files["val"], doc_starts, cfg.seq_len, cfg.val_fraction)
        if files["train"].tokens < cfg.seq_len + 1:
            raise DataError(
                f"training split has {files['train'].tokens} tokens, fewer than data.seq_len + 1 = {cfg.seq_len + 1}; "
                f"lower data.val_fraction ({cfg.val_fraction}) or add data"
            )
        for f in files.values():
            f.close()
            f.commit()
    finally:
        for f in files.values():
            f.discard()  # no-op after commit; removes temporary files after an error or interruption
    stats = {s: {"file": f.path.name, "tokens": f.tokens, "documents": f.documents} for s, f in files.items()}
    stats["val"]["formed_by"] = formed_by
    return {"dtype": dtype.name, **stats, "bytes_read": bytes_read}


def prepare_data(
    cfg: DataConfig, out_dir: str | Path, log: Callable[[str], None] = print, cache_dir: str | Path | None = None
) -> Path:
    """Build `out_dir/{tokenizer.model, train.bin, val.bin, meta.json}` unless an identical build exists.

    Documents get an EOS after each; token streams are flat uint16 (uint32 above 65536 ids). The
    embedded corpus, when `cfg.path` is empty, is materialised in `cache_dir` (default
    `out_dir/cache`). Returns `out_dir`. Call on one rank and barrier the others.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = parse_sources(cfg.path, Path(cache_dir) if cache_dir else out_dir / "cache")
    fp, inputs = fingerprint(cfg, sources)
    meta = _cached(out_dir, fp)
    if meta is not None:
        log(f"data: using cached {out_dir} (train {meta['train']['tokens']:,} tokens, val {meta['val']['tokens']:,})")
        return out_dir
    (out_dir / META_FILE).unlink(missing_ok=True)  # from here on the directory is "not finished"
    for source in sources:
        log(f"data: source {source.describe()}")

    t0 = time.perf_counter()
    tokenizer = _tokenizer_for(cfg, sources, out_dir, log)
    t1 = time.perf_counter()
    log(f"data: {tokenizer} ready in {t1 - t0:.1f}s")
    packed = _pack(cfg, sources, tokenizer, out_dir)
    t2 = time.perf_counter()

    skips = SkipCounter()
    for source in sources:
        skips.counts.update(source.skips.counts)
    train, val = packed["train"], packed["val"]
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "inputs": inputs,
        "seq_len": cfg.seq_len,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "trained": not cfg.tokenizer,
            "requested_vocab_size": None if cfg.tokenizer else cfg.vocab_size,
        },
        **packed,
        "documents_read": train["documents"] + val["documents"],
        "documents_skipped": skips.total,
        "skipped_by_reason": skips.by_reason(),
        "skipped_by_file": skips.by_file(),
        "seconds": {"tokenizer": round(t1 - t0, 3), "tokenize": round(t2 - t1, 3)},
        "tokens_per_second": round((train["tokens"] + val["tokens"]) / max(t2 - t1, 1e-9)),
    }
    _write_atomic(out_dir / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    log(
        f"data: {meta['documents_read']:,} documents ({skips.summary()}), train {train['tokens']:,} tokens, "
        f"val {val['tokens']:,} tokens ({val['formed_by']}), {meta['tokens_per_second']:,} tokens/s"
    )
    return out_dir


@dataclass
class PreparedData:
    """What the trainer needs from a prepared data directory."""

    root: Path
    meta: dict
    tokenizer: Tokenizer
    train: PackedSequences
    val: PackedSequences

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @classmethod
    def load(cls, out_dir: str | Path, seq_len: int | None = None) -> PreparedData:
        """Open a directory written by `prepare_data`; `seq_len` defaults to the one it was built for."""
        root = Path(out_dir)
        try:
            meta = json.loads((root / META_FILE).read_text())
        except FileNotFoundError as e:
            raise DataError(
                f"'{root}' has no {META_FILE}; run prepare_data first (an interrupted build leaves none)"
            ) from e
        tokenizer = Tokenizer(root / meta["tokenizer"]["file"])
        if tokenizer.sha256 != meta["tokenizer"]["sha256"]:
            raise DataError(f"'{tokenizer.path}' does not match {META_FILE} (sha256 differs); rebuild the data")
        seq_len = seq_len or meta["seq_len"]
        splits = {}
        for split in ("train", "val"):
            seqs = PackedSequences(root / meta[split]["file"], seq_len, meta["dtype"])
            if seqs.num_tokens != meta[split]["tokens"]:
                raise DataError(
                    f"'{seqs.path}' holds {seqs.num_tokens} tokens but {META_FILE} says {meta[split]['tokens']}; "
                    "rebuild the data"
                )
            splits[split] = seqs
        return cls(root, meta, tokenizer, splits["train"], splits["val"])
