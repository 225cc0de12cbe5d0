"""Sources -> sharded megatron-core IndexedDataset files (.bin/.idx), in parallel, resumable, with manifests.

Layout under `out_dir`:

    tokenizer.model                                    the tokenizer every shard was built with
    <input>/<split>/<set>/<shard>.bin|.idx             one IndexedDataset per (input shard, split, set)
    <input>/manifests/<split>-<shard>.json             written last: the unit is finished
    report.json                                        totals, skips per file and reason, reconciliation

A unit of work is one group of input files of one split (a Pile shard, or PG-19 books up to
`shard_bytes`). Each unit writes under temporary names, renames, and then writes its manifest, so a
rerun after an interruption skips exactly the finished units. Units run in a local process pool, or
are dealt round-robin to MPI ranks when launched under `mpirun` (mpi4py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hybrid_pretrain.base.hashing import file_sha256
from hybrid_pretrain.data_pipeline.documents import Source
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.pieces import cut_long
from hybrid_pretrain.data_pipeline.sources import DEFAULT_MAX_LINE_BYTES, parse_sources
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer

FORMAT_VERSION = 1
TOKENIZER_FILE, REPORT_FILE, MANIFEST_DIR = "tokenizer.model", "report.json", "manifests"
ENCODE_BATCH_BYTES = 1_000_000
NATIVE_SPLITS = ("train", "validation", "test")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything a unit's output depends on besides its input files and the tokenizer."""

    shard_bytes: int = 256_000_000  # group small files (PG-19 books) into shards of about this many bytes
    max_doc_chars: int = 100_000  # chunk longer documents (PG-19 books) at paragraph breaks; 0: never
    val_fraction: float = 0.01  # held out by hash from sources without a native validation split
    pile_sets: tuple[str, ...] = ()  # keep only these Pile `meta.pile_set_name`s; empty: all
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # a longer JSON-lines record is skipped as "line_too_long"

    def validate(self) -> None:
        if self.shard_bytes <= 0:
            raise DataError(f"shard_bytes must be positive, got {self.shard_bytes}")
        if self.max_doc_chars < 0:
            raise DataError(f"max_doc_chars must be >= 0 (0: no chunking), got {self.max_doc_chars}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_line_bytes <= 0:
            raise DataError(f"max_line_bytes must be positive, got {self.max_line_bytes}")


@dataclass(frozen=True)
class Unit:
    """One manifest's worth of work: `files` of `split` from the `source_index`-th source of `input`."""

    input: str
    spec: str
    source_index: int
    split: str
    shard: str
    files: tuple[str, ...]

    @property
    def manifest_name(self) -> str:
        return f"{self.split}-{self.shard}.json"


def set_slug(name: str) -> str:
    """Folder-safe set name: 'DM Mathematics' -> 'DM_Mathematics', 'Gutenberg (PG-19)' -> 'Gutenberg_PG-19'."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.-]", "_", name)).strip("_") or "unnamed"


def parse_inputs(specs: list[str]) -> dict[str, str]:
    """`["pile=/data/pile", "pg19=/data/pg19"]` -> {name: data.path spec}; names become folder names."""
    inputs: dict[str, str] = {}
    for item in specs:
        name, sep, spec = item.partition("=")
        if not sep or not spec or not _NAME.match(name):
            raise DataError(f"input '{item}' must look like NAME=SPEC with NAME of letters, digits, '_.-'")
        if name in inputs:
            raise DataError(f"input name '{name}' is given twice; expected one NAME=SPEC per name")
        inputs[name] = spec
    if not inputs:
        raise DataError("no inputs given; expected at least one NAME=SPEC")
    return inputs


def _configure(source: Source, settings: PreprocessSettings) -> Source:
    if hasattr(source, "sets"):
        source.sets = frozenset(settings.pile_sets) or None
    if hasattr(source, "on_bad_file"):
        source.on_bad_file = "skip"  # one bad file is reported, never the end of a long job
    if hasattr(source, "max_line_bytes"):
        source.max_line_bytes = settings.max_line_bytes
    return source


def plan_units(inputs: dict[str, str], settings: PreprocessSettings) -> list[Unit]:
    """Every unit of work, in a deterministic order; specs are resolved now so typos fail at once."""
    units: list[Unit] = []
    for name, spec in inputs.items():
        for index, source in enumerate(parse_sources(spec)):
            for split in source.splits:
                files = source.files(split) or [Path(source.spec)]  # a hub dataset has no local files
                groups: list[list[Path]] = [[]]
                size = 0
                for path in files:
                    nbytes = path.stat().st_size if path.is_file() else 0
                    if groups[-1] and size + nbytes > settings.shard_bytes:
                        groups.append([])
                        size = 0
                    groups[-1].append(path)
                    size += nbytes
                for k, group in enumerate(groups):
                    shard = f"s{index}-{k:05d}"
                    units.append(Unit(name, spec, index, split, shard, tuple(str(p) for p in group)))
    return units


def _chunks(text: str, max_chars: int) -> Iterator[str]:
    """Split a long document at paragraph (else line) breaks into pieces of at most about `max_chars`.

    A whole PG-19 book is one document of up to millions of tokens; as chunks it shuffles and blends at
    a useful granularity. Each chunk is a document to the model too (it ends with EOS): better an EOS it
    can see than an unmarked jump into another book after the sample shuffle.
    """
    if not max_chars or len(text) <= max_chars:
        yield text
        return
    buf: list[str] = []
    size = 0
    for para in re.split(r"(?<=\n\n)", text):
        pieces = [para] if len(para) <= max_chars else para.splitlines(keepends=True)
        for piece in pieces:
            if len(piece) > max_chars:  # one enormous line: cut it hard (by offsets: linear in its length)
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                head, piece = cut_long(piece, max_chars)
                yield from head
            if size + len(piece) > max_chars and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(piece)
            size += len(piece)
    if buf and "".join(buf).strip():
        yield "".join(buf)


def _held_out(text: str, fraction: float) -> bool:
    """Order-free hold-out by content hash (same rule as the skeleton's packer): duplicates stay together."""
    return zlib.crc32(text.encode("utf-8")) < fraction * 2**32


class _ShardWriter:
    """One IndexedDataset being written under temporary names; `commit` renames .bin and .idx into place."""

    def __init__(self, prefix: Path, dtype: type) -> None:
        # optional: megatron-core only for indexed shards
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.tmp = prefix.with_name(f"{prefix.name}.tmp{os.getpid()}")
        self.builder = IndexedDatasetBuilder(f"{self.tmp}.bin", dtype=dtype)
        self.documents = self.sequences = self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.builder.add_document(ids, [len(ids)])  # one sequence per document: GPTDataset shuffles sequences
        self.sequences += 1
        self.tokens += len(ids)

    def commit(self, root: Path) -> dict:
        self.builder.finalize(f"{self.tmp}.idx")
        for ext in (".bin", ".idx"):
            os.replace(f"{self.tmp}{ext}", f"{self.prefix}{ext}")
        bin_path, idx_path = Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")
        return {
            "prefix": str(self.prefix.relative_to(root)),
            "documents": self.documents,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "bin_bytes": bin_path.stat().st_size,
            "idx_bytes": idx_path.stat().st_size,
            "bin_sha256": file_sha256(bin_path),
            "idx_sha256": file_sha256(idx_path),
        }

    def discard(self) -> None:
        self.builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(f"{self.tmp}{ext}").unlink(missing_ok=True)


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(path: str) -> Tokenizer:
    if path not in _TOKENIZERS:  # once per worker process
        _TOKENIZERS[path] = Tokenizer(path)
    return _TOKENIZERS[path]


def _batches(docs: Iterator[tuple[str, str, str, bool]]) -> Iterator[list[tuple[str, str, str, bool]]]:
    """Group (split, set, text, first-chunk) items so each encode call gets about ENCODE_BATCH_BYTES of text."""
    batch: list[tuple[str, str, str, bool]] = []
    size = 0
    for item in docs:
        batch.append(item)
        size += len(item[2])
        if size >= ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def process_unit(unit: Unit, out_dir: str, settings: PreprocessSettings, encode_threads: int = 1) -> dict:
    """Tokenise one unit into its shards and write its manifest; returns the manifest.

    Each document (or chunk of a long one) gets an EOS. Bad records are skipped and counted by the
    readers; a file that cannot be read at all (corrupt zstd) is counted as one skipped record with
    the reason, and the unit still finishes.
    """
    t0 = time.perf_counter()
    root = Path(out_dir)
    tokenizer = _tokenizer(str(root / TOKENIZER_FILE))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    source = _configure(parse_sources(unit.spec)[unit.source_index], settings)
    hold_out = "validation" not in source.splits and unit.split == "train"
    writers: dict[tuple[str, str], _ShardWriter] = {}
    skips = source.skips
    written = 0

    def documents() -> Iterator[tuple[str, str, str, bool]]:
        nonlocal written
        split = unit.split
        for file in unit.files:
            try:
                for doc in source.records(unit.split, [Path(file)] if source.files(unit.split) else None):
                    first = not doc.continues  # a streamed .txt's later pieces belong to the same document
                    if first:
                        held_out = hold_out and _held_out(doc.text, settings.val_fraction)
                        split = "validation" if held_out else unit.split
                        written += 1
                    for chunk in _chunks(doc.text, settings.max_doc_chars):
                        yield split, doc.set_name or unit.input, chunk, first
                        first = False
            except DataError as e:
                skips.count_read(file)
                skips.add(file, "unreadable")
                skips.warnings[file] = str(e)

    try:
        for batch in _batches(documents()):
            ids_list = tokenizer.encode_batch([chunk for _, _, chunk, _ in batch], num_threads=encode_threads)
            for (split, set_name, _, first), ids in zip(batch, ids_list):
                key = (split, set_slug(set_name))
                if key not in writers:
                    writers[key] = _ShardWriter(root / unit.input / split / key[1] / unit.shard, dtype)
                ids.append(tokenizer.eos_id)
                writers[key].add(np.asarray(ids, dtype=dtype))
                writers[key].documents += first
        outputs = [dict(w.commit(root), split=k[0], set=k[1]) for k, w in sorted(writers.items())]
    finally:
        for w in writers.values():
            w.discard()  # no-op for committed shards: their temporary names are gone
    read = sum(skips.read.values())
    manifest = {
        "format": FORMAT_VERSION,
        "unit": asdict(unit),
        "settings": asdict(settings),
        "tokenizer_sha256": tokenizer.sha256,
        "sources": [
            {"path": f, "bytes": Path(f).stat().st_size, "sha256": file_sha256(Path(f))}
            for f in unit.files
            if Path(f).is_file()
        ],
        "outputs": outputs,
        "documents_read": read,
        "documents_written": written,
        "documents_skipped": skips.total,
        "reconciled": read == written + skips.total,
        "skipped_by_file": skips.by_file(),
        "warnings": dict(skips.warnings),
        "seconds": round(time.perf_counter() - t0, 3),
        "tokens": sum(o["tokens"] for o in outputs),
    }
    path = root / unit.input / MANIFEST_DIR / unit.manifest_name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return manifest


def finished_manifest(unit: Unit, root: Path, tokenizer_sha: str, settings: PreprocessSettings) -> dict | None:
    """The unit's manifest if its outputs are complete and match the inputs, tokenizer and settings."""
    try:
        manifest = json.loads((root / unit.input / MANIFEST_DIR / unit.manifest_name).read_text())
        settings_json = json.loads(json.dumps(asdict(settings)))  # tuples come back from JSON as lists
        if manifest["tokenizer_sha256"] != tokenizer_sha or manifest["settings"] != settings_json:
            return None
        if manifest["unit"]["files"] != list(unit.files) or manifest["unit"]["spec"] != unit.spec:
            return None
        for src in manifest["sources"]:
            if Path(src["path"]).stat().st_size != src["bytes"]:
                return None
        for out in manifest["outputs"]:
            for ext, key in ((".bin", "bin_bytes"), (".idx", "idx_bytes")):
                if (root / f"{out['prefix']}{ext}").stat().st_size != out[key]:
                    return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _install_tokenizer(tokenizer_path: str | Path, root: Path) -> Tokenizer:
    """Copy the tokenizer into `root`, refusing to mix shards of two tokenizers in one folder."""
    new = Tokenizer(tokenizer_path)
    target = root / TOKENIZER_FILE
    if target.is_file():
        old = Tokenizer(target)
        if old.sha256 != new.sha256:
            raise DataError(
                f"'{root}' holds shards built with tokenizer {old.sha256[:12]}, not '{tokenizer_path}' "
                f"({new.sha256[:12]}); expected a new output folder for a new tokenizer"
            )
        return old
    if new.eos_id < 0:
        raise DataError(f"tokenizer '{tokenizer_path}' has no EOS piece; packing needs one between documents")
    root.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.copyfile(tokenizer_path, tmp)
    os.replace(tmp, target)
    return Tokenizer(target)


def _run_unit(args: tuple[Unit, str, PreprocessSettings, int]) -> dict:
    return process_unit(*args)


def summarize(manifests: list[dict]) -> dict:
    """Totals per input/split/set and the reconciliation read = written + skipped over all manifests."""
    sets: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    skipped_by_reason: Counter[str] = Counter()
    skipped_by_file: dict[str, dict[str, int]] = {}
    warnings: dict[str, str] = {}
    for m in manifests:
        for out in m["outputs"]:
            key = f"{m['unit']['input']}/{out['split']}/{out['set']}"
            sets[key] += out["tokens"]
            docs[key] += out["documents"]
        for file, reasons in m["skipped_by_file"].items():
            skipped_by_file.setdefault(file, {}).update(reasons)
            skipped_by_reason.update(reasons)
        warnings.update(m["warnings"])
    read = sum(m["documents_read"] for m in manifests)
    written = sum(m["documents_written"] for m in manifests)
    skipped = sum(m["documents_skipped"] for m in manifests)
    return {
        "format": FORMAT_VERSION,
        "units": len(manifests),
        "documents_read": read,
        "documents_written": written,
        "documents_skipped": skipped,
        "reconciled": read == written + skipped,
        "tokens": sum(sets.values()),
        "tokens_by_set": dict(sorted(sets.items())),
        "documents_by_set": dict(sorted(docs.items())),
        "skipped_by_reason": dict(sorted(skipped_by_reason.items())),
        "skipped_by_file": skipped_by_file,
        "warnings": warnings,
    }


def _mpi_world():  # noqa: ANN202 - mpi4py's communicator, or None outside mpirun
    """COMM_WORLD when this process is one of several MPI ranks, else None (plain runs never import MPI)."""
    if not any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_SIZE")):
        return None
    from mpi4py import MPI  # optional: MPI only under mpirun

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def preprocess(
    inputs: dict[str, str],
    out_dir: str | Path,
    tokenizer_path: str | Path,
    settings: PreprocessSettings = PreprocessSettings(),  # noqa: B008 - frozen, so a shared default is safe
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Build (or finish) the sharded dataset in `out_dir`; returns the report, also written to report.json.

    Under `mpirun -np N` each rank takes every N-th unfinished unit and rank 0 writes the report; the
    other ranks return it too. Otherwise `workers` processes share the units.
    """
    settings.validate()
    if workers <= 0:
        raise DataError(f"workers must be a positive integer, got {workers}")
    root = Path(out_dir)
    comm = _mpi_world()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    if rank == 0:
        tokenizer = _install_tokenizer(tokenizer_path, root)
    if comm:
        comm.Barrier()
        tokenizer = Tokenizer(root / TOKENIZER_FILE)
    units = plan_units(inputs, settings)
    done = {u: m for u in units if (m := finished_manifest(u, root, tokenizer.sha256, settings)) is not None}
    todo = [u for u in units if u not in done]
    if rank == 0:
        log(f"preprocess: {len(units)} units, {len(done)} already finished, {len(todo)} to build "
            f"({'MPI ranks: ' + str(size) if comm else f'workers: {workers}'})")
    t0 = time.perf_counter()
    mine = todo[rank::size]
    jobs = [(u, str(root), settings, 1 if workers > 1 or comm else 0) for u in mine]
    new: list[dict] = []
    with tqdm(total=len(mine), desc=f"shards (rank {rank})" if comm else "shards", unit="shard", disable=None) as bar:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                for manifest in pool.imap_unordered(_run_unit, jobs):
                    new.append(manifest)
                    bar.update()
        else:
            for job in jobs:
                new.append(_run_unit(job))
                bar.update()
    if comm:
        gathered = comm.gather(new, root=0)
        new = [m for part in gathered for m in part] if rank == 0 else []
    seconds = time.perf_counter() - t0
    report = None
    if rank == 0:
        manifests = list(done.values()) + new
        manifests.sort(key=lambda m: (m["unit"]["input"], m["unit"]["split"], m["unit"]["shard"]))
        report = summarize(manifests)
        new_tokens = sum(m["tokens"] for m in new)
        report.update(
            tokenizer_sha256=tokenizer.sha256,
            units_built=len(new),
            units_skipped_finished=len(done),
            seconds=round(seconds, 3),
            tokens_per_second=round(new_tokens / max(seconds, 1e-9)),
        )
        tmp = root / f"{REPORT_FILE}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, root / REPORT_FILE)
        skipped = ", ".join(f"{r}: {n}" for r, n in report["skipped_by_reason"].items()) or "none"
        log(f"preprocess: read {report['documents_read']:,} = written {report['documents_written']:,} + skipped "
            f"{report['documents_skipped']:,} ({skipped}); {report['tokens']:,} tokens; "
            f"{'reconciled' if report['reconciled'] else 'NOT RECONCILED'}; {report['tokens_per_second']:,} tokens/s")
        for file, warning in report["warnings"].items():
            log(f"preprocess: warning: {file}: {warning}")
    if comm:
        report = comm.bcast(report, root=0)
    return report
