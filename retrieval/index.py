"""FAISS passage indexes: flat, IVF-PQ (optionally with exact re-ranking) and HNSW, sharded and versioned.

Every index is built with `faiss.index_factory` and keeps the passage store's ids (IVF natively,
the others through `IndexIDMap2`), so search results are passage ids, never row numbers. A
`ShardedIndex` is one FAISS index per shard (per rank at build time); searches run through
`faiss.IndexShards`, but persistence is shard by shard because `IndexShards` cannot be written.

On disk an index folder holds immutable versions and a pointer, like a checkpoint folder:

    <dir>/v000003/{manifest.json, shard_00000.faiss, ...}
    <dir>/CURRENT          "v000003", replaced atomically once the version folder is complete

so a reader (the index service) never sees a half-written index and can swap to a new version whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from hybrid_pretrain.base.hashing import file_sha256
from hybrid_pretrain.retrieval.config import KINDS
from hybrid_pretrain.retrieval.errors import RetrievalIndexError

FORMAT = 1
KEEP_VERSIONS = 3


@dataclass
class IndexSpec:
    kind: str = "flat"  # flat | ivfpq | hnsw
    nlist: int = 0  # IVF lists; 0: about 4 * sqrt(n)
    pq_m: int = 0  # PQ sub-quantizers; 0: d / 4 (so 8 bits per 4 dims)
    pq_bits: int = 8
    nprobe: int = 32
    refine: bool = False  # IVF-PQ only: keep full vectors and re-rank candidates exactly (IndexRefineFlat)
    refine_k_factor: int = 10
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128

    def validate(self, d: int) -> None:
        if self.kind not in KINDS:
            raise RetrievalIndexError(f"index.kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        if self.kind == "ivfpq" and d % self.pq_m_for(d):
            raise RetrievalIndexError(f"index.pq_m ({self.pq_m}) must divide the embedding dimension {d}")
        for name in ("nprobe", "refine_k_factor", "hnsw_m", "ef_construction", "ef_search", "pq_bits"):
            if getattr(self, name) <= 0:
                raise RetrievalIndexError(f"index.{name} must be positive, got {getattr(self, name)}")

    def pq_m_for(self, d: int) -> int:
        return self.pq_m or max(1, d // 4)

    def nlist_for(self, n: int) -> int:
        if self.nlist:
            return self.nlist
        return int(max(1, min(4 * math.sqrt(max(n, 1)), n // 39 or 1)))  # FAISS wants ~39 training points per list

    def factory(self, d: int, n: int) -> str:
        """The `faiss.index_factory` string for `n` vectors of dimension `d`."""
        if self.kind == "flat":
            return "IDMap2,Flat"
        if self.kind == "hnsw":
            return f"IDMap2,HNSW{self.hnsw_m}"
        ivf = f"IVF{self.nlist_for(n)},PQ{self.pq_m_for(d)}x{self.pq_bits}"
        return f"IDMap2,{ivf},RFlat" if self.refine else ivf  # IVF keeps ids itself; RFlat does not

    @property
    def removable(self) -> bool:
        """Whether incremental refresh (remove_ids) works: flat and plain IVF-PQ yes, HNSW and RFlat no."""
        return self.kind == "flat" or (self.kind == "ivfpq" and not self.refine)


def configure(index: faiss.Index, spec: IndexSpec) -> None:
    """Apply the search-time knobs (nprobe, k_factor, efSearch) to one shard."""
    ps = faiss.ParameterSpace()
    if spec.kind == "ivfpq":
        ps.set_index_parameter(index, "nprobe", spec.nprobe)
        if spec.refine:
            ps.set_index_parameter(index, "k_factor_rf", spec.refine_k_factor)
    elif spec.kind == "hnsw":
        ps.set_index_parameter(index, "efSearch", spec.ef_search)


def train_sample(x: np.ndarray, spec: IndexSpec, n_total: int, seed: int = 0) -> np.ndarray:
    """A deterministic subset large enough for the coarse and PQ k-means (FAISS caps at 256 points per centroid)."""
    need = min(len(x), max(spec.nlist_for(n_total), 2**spec.pq_bits) * 256)
    if need >= len(x):
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), need, replace=False))]


def build_shard(spec: IndexSpec, x: np.ndarray, ids: np.ndarray, n_total: int | None = None) -> faiss.Index:
    """One trained, filled shard of `x` (n, d) float32 with int64 `ids`; `n_total` sizes IVF across all shards."""
    x, ids = np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
    d = x.shape[1]
    spec.validate(d)
    n_total = n_total or len(x)
    index = faiss.index_factory(d, spec.factory(d, n_total), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efConstruction = spec.ef_construction
    if spec.kind == "ivfpq":
        # the factory turns on polysemous training (10x the train time) for a search mode we never use
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    if not index.is_trained:
        index.train(train_sample(x, spec, n_total))
    index.add_with_ids(x, ids)
    configure(index, spec)
    return index


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """Search copy on all GPUs when GPU FAISS is installed; HNSW (CPU-only in FAISS) stays on the CPU."""
    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:  # e.g. HNSW, which FAISS cannot clone to the GPU
        warnings.warn(f"index stays on the CPU: {str(e).splitlines()[0]}", stacklevel=2)
        return index


class ShardedIndex:
    """Shards searched as one (`Retriever`); CPU shards stay the source of truth, GPU copies only search."""

    def __init__(self, spec: IndexSpec, shards: list[faiss.Index], use_gpu: bool = True) -> None:
        if not shards:
            raise RetrievalIndexError("a ShardedIndex needs at least one shard")
        self.spec, self.shards, self.use_gpu = spec, shards, use_gpu
        self.d = shards[0].d
        self._rebuild_search()

    def _rebuild_search(self) -> None:
        searchers = [_to_gpu(s) if self.use_gpu else s for s in self.shards]
        if len(searchers) == 1:
            self._searchers, self._search_index = searchers, searchers[0]
            return
        joined = faiss.IndexShards(self.d, True, False)  # threaded, ids kept as stored (not renumbered)
        for s in searchers:
            joined.add_shard(s)
        self._searchers, self._search_index = searchers, joined  # keep references: IndexShards does not own shards

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 (n, d) -> (scores (n, k), ids (n, k)), inner product, best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise RetrievalIndexError(f"queries must have shape (n, {self.d}), got {tuple(q.shape)}")
        if k <= 0:
            raise RetrievalIndexError(f"k must be positive, got {k}")
        return self._search_index.search(q, k)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors to the emptiest shard (keeps shards balanced for parallel search)."""
        if len(ids):
            shard = min(self.shards, key=lambda s: s.ntotal)
            shard.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
            self._rebuild_search()

    def remove(self, ids: np.ndarray) -> int:
        """Remove `ids` from every shard; returns how many vectors went. Only for `spec.removable` kinds."""
        if not self.spec.removable:
            raise RetrievalIndexError(
                f"index kind '{self.spec.kind}'{' with refine' if self.spec.refine else ''} cannot remove ids; "
                "use a full refresh (or kind flat / ivfpq without refine)"
            )
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        removed = sum(s.remove_ids(sel) for s in self.shards)
        self._rebuild_search()
        return int(removed)

    def save_shards(self, folder: Path, first: int = 0) -> list[dict]:
        """Write shard i as shard_{first+i:05d}.faiss; returns their manifest entries."""
        entries = []
        for i, shard in enumerate(self.shards):
            path = Path(folder) / f"shard_{first + i:05d}.faiss"
            faiss.write_index(shard, str(path))
            entries.append({"file": path.name, "ntotal": int(shard.ntotal), "sha256": file_sha256(path)})
        return entries


def current_version(index_dir: str | Path) -> int | None:
    """The published version number, or None when nothing was published yet."""
    pointer = Path(index_dir) / "CURRENT"
    if not pointer.is_file():
        return None
    return int(pointer.read_text().strip().lstrip("v"))


def version_dir(index_dir: str | Path, version: int) -> Path:
    return Path(index_dir) / f"v{version:06d}"


def staging_dir(index_dir: str | Path, version: int) -> Path:
    """Where all ranks write the shards of `version` before rank 0 publishes it."""
    return Path(index_dir) / f"v{version:06d}.staging"


def publish(index_dir: str | Path, version: int, manifest: dict) -> Path:
    """Write the manifest into the staging folder, rename it to its version and move CURRENT to it.

    The caller holds the folder's BuildLock (retrieval.build_lock); a version folder that already exists is
    refused rather than replaced, since a reader may be serving it.
    """
    index_dir = Path(index_dir)
    stage, final = staging_dir(index_dir, version), version_dir(index_dir, version)
    if final.exists():
        raise RetrievalIndexError(f"{final} already exists; versions are never replaced (was it built without "
                                  "the folder's build lock?)")
    manifest = {"format": FORMAT, "version": version, "created": time.time(), **manifest}
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(stage, final)
    tmp = index_dir / f"CURRENT.tmp{os.getpid()}"
    tmp.write_text(f"v{version:06d}\n")
    os.replace(tmp, index_dir / "CURRENT")
    for old in sorted(index_dir.glob("v[0-9]*")):  # keep a few versions: a reader may still be loading one
        if old.is_dir() and not old.name.endswith(".staging") and int(old.name[1:]) <= version - KEEP_VERSIONS:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(index_dir: str | Path, version: int | None = None) -> dict:
    version = current_version(index_dir) if version is None else version
    if version is None:
        raise RetrievalIndexError(f"index folder '{index_dir}' has no CURRENT pointer; build an index first")
    path = version_dir(index_dir, version) / "manifest.json"
    if not path.is_file():
        raise RetrievalIndexError(f"index version {version} in '{index_dir}' has no manifest.json")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise RetrievalIndexError(f"{path}: index format {manifest.get('format')} is not supported (expected {FORMAT})")
    return manifest


def load_index(index_dir: str | Path, version: int | None = None, use_gpu: bool = True,
               verify: bool = True) -> tuple[ShardedIndex, dict]:
    """(index, manifest) of the published (or a given) version; `verify` checks every shard's sha256."""
    manifest = read_manifest(index_dir, version)
    folder = version_dir(index_dir, manifest["version"])
    shards = []
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if verify and file_sha256(path) != entry["sha256"]:
            raise RetrievalIndexError(f"{path}: sha256 does not match the manifest; the shard is corrupt, rebuild")
        shards.append(faiss.read_index(str(path)))
    spec = IndexSpec(**manifest["spec"])
    for s in shards:
        configure(s, spec)
    return ShardedIndex(spec, shards, use_gpu=use_gpu), manifest


def spec_dict(spec: IndexSpec) -> dict:
    return asdict(spec)
