"""FAISS passage indexes: flat, IVF-PQ (optionally with exact re-ranking) and HNSW, sharded and versioned.

Which index and which search parameters: `kind: auto` is chosen from the corpus size (retrieval.auto),
nprobe / efSearch / k_factor are tuned to a recall target at build time (retrieval.tuning), and IVF-PQ
can re-rank from full vectors on disk (retrieval.full_vectors); the spec stored in the manifest carries
the tuned parameters, so every reader (in-process, LiveIndex, the service) searches with them.

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
from tqdm import tqdm

from hybrid_pretrain.base.hashing import file_sha256
from hybrid_pretrain.retrieval.config import KINDS
from hybrid_pretrain.retrieval.errors import RetrievalIndexError
from hybrid_pretrain.retrieval.full_vectors import FullVectors

FORMAT = 1
KEEP_VERSIONS = 3


@dataclass
class IndexSpec:
    kind: str = "flat"  # auto | flat | ivfpq | hnsw; auto is resolved by retrieval.auto.choose_spec
    nlist: int = 0  # IVF lists; 0: about 4 * sqrt(n)
    pq_m: int = 0  # PQ sub-quantizers; 0: d / 4 (so 8 bits per 4 dims)
    pq_bits: int = 8
    fast_scan: bool = False  # IVF-PQ with 4-bit codes scanned in SIMD registers (FAISS's PQ<m>x4fs), see factory
    nprobe: int = 32
    refine: bool = False  # IVF-PQ only: keep full vectors in RAM and re-rank candidates exactly (IndexRefineFlat)
    refine_k_factor: int = 10  # candidates per result re-ranked, for `refine` and `rerank`
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    coarse: str = "flat"  # IVF coarse quantizer: flat (exact) | hnsw (HNSW32 over the centroids while building,
    #                       for fast assignment of many vectors to many lists; flat again for search: flat_coarse)
    opq: bool = False  # IVF-PQ: learn an OPQ rotation before PQ
    rerank: bool = False  # IVF-PQ: re-rank candidates exactly from full vectors memory-mapped from disk
    target_recall: float = 0.0  # > 0: the builder tunes nprobe / efSearch / k_factor for it (retrieval.tuning)

    def validate(self, d: int) -> None:
        if self.kind not in KINDS:
            raise RetrievalIndexError(f"index.kind must be one of {', '.join(KINDS)}, got '{self.kind}' "
                                      "(resolve 'auto' with retrieval.auto.choose_spec first)")
        if self.kind == "ivfpq" and d % self.pq_m_for(d):
            raise RetrievalIndexError(f"index.pq_m ({self.pq_m}) must divide the embedding dimension {d}")
        for name in ("nprobe", "refine_k_factor", "hnsw_m", "ef_construction", "ef_search", "pq_bits"):
            if getattr(self, name) <= 0:
                raise RetrievalIndexError(f"index.{name} must be positive, got {getattr(self, name)}")
        if self.coarse not in ("flat", "hnsw"):
            raise RetrievalIndexError(f"index.coarse must be flat or hnsw, got '{self.coarse}'")
        if self.fast_scan and (self.kind != "ivfpq" or self.pq_bits != 4):
            raise RetrievalIndexError(f"index.fast_scan needs kind ivfpq with pq_bits 4 (FAISS's 4-bit fast-scan "
                                      f"codes), got kind '{self.kind}' with pq_bits {self.pq_bits}")
        if self.refine and self.rerank:
            raise RetrievalIndexError("index.refine (full vectors in RAM) and index.rerank (on disk) exclude "
                                      "each other")
        check_target_recall(self.target_recall, allow_zero=True)

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
        m = self.pq_m_for(d)
        coarse = "_HNSW32" if self.coarse == "hnsw" else ""
        # fast scan: 16-entry distance tables live in SIMD registers and 32 codes are scored per shuffle, where 8-bit
        # PQ looks every sub-code up in memory; its coarser codes need a larger re-rank, which the tuning picks
        codes = f"PQ{m}x4fs" if self.fast_scan else f"PQ{m}x{self.pq_bits}"
        ivf = f"{f'OPQ{m},' if self.opq else ''}IVF{self.nlist_for(n)}{coarse},{codes}"
        return f"IDMap2,{ivf},RFlat" if self.refine else ivf  # IVF keeps ids itself; RFlat does not

    @property
    def removable(self) -> bool:
        """Whether incremental refresh (remove_ids) works: flat and plain IVF-PQ yes; HNSW, RFlat, rerank and fast
        scan no (FAISS 1.15's fast-scan lists lose vectors added after a removal: a re-added vector is never found)."""
        return self.kind == "flat" or (self.kind == "ivfpq" and not (self.refine or self.rerank or self.fast_scan))

    @property
    def reranks(self) -> bool:
        """Whether searches re-rank k * refine_k_factor candidates from full vectors on disk (full_vectors.py)."""
        return self.kind == "ivfpq" and self.rerank


def check_target_recall(value: float, allow_zero: bool = False) -> None:
    """Refuse a recall target outside (0, 1] (0 too when `allow_zero`: it means "do not tune")."""
    if not (0.0 < value <= 1.0 or (allow_zero and value == 0.0)):
        raise RetrievalIndexError(f"index.target_recall must be in (0, 1] (recall@k of the tuned index), got {value}")


def configure(index: faiss.Index, spec: IndexSpec) -> None:
    """Apply the search-time knobs (nprobe, k_factor, efSearch) to one shard."""
    ps = faiss.ParameterSpace()
    if spec.kind == "ivfpq":
        ps.set_index_parameter(index, "nprobe", spec.nprobe)
        if spec.coarse == "hnsw" and isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer),
                                                faiss.IndexHNSW):
            # an index saved before flat_coarse: the centroid graph must return nprobe lists (more slack
            # measured 13% slower at 1M for 0.001 recall)
            ps.set_index_parameter(index, "quantizer_efSearch", max(spec.nprobe, 16))
        if spec.refine:
            ps.set_index_parameter(index, "k_factor_rf", spec.refine_k_factor)
    elif spec.kind == "hnsw":
        ps.set_index_parameter(index, "efSearch", spec.ef_search)


TRAIN_POINTS_PER_LIST = 40  # coarse k-means sample: just above FAISS's 39-point warning, far below its 256 cap
KMEANS_ITERATIONS = 10  # coarse and PQ k-means (FAISS: 10 and 25); training dominates a 1M build on a small CPU
ADD_CHUNK = 65_536  # vectors encoded and added per step: bounds the temporaries of a 1M-vector add


def train_sample(x: np.ndarray, spec: IndexSpec, n_total: int, seed: int = 0) -> np.ndarray:
    """A deterministic float32 subset for the coarse and PQ k-means; `x` may be a memory map (rows are copied)."""
    need = min(len(x), max(spec.nlist_for(n_total) * TRAIN_POINTS_PER_LIST, 2**spec.pq_bits * 256))
    if need >= len(x):
        return np.ascontiguousarray(x, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(x), need, replace=False))
    return np.ascontiguousarray(x[rows], dtype=np.float32)


def _new_index(spec: IndexSpec, d: int, n_total: int) -> faiss.Index:
    index = faiss.index_factory(d, spec.factory(d, n_total), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efConstruction = spec.ef_construction
    if spec.kind == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        # the factory turns on polysemous training (10x the train time) for a search mode we never use
        ivf_pq = faiss.downcast_index(ivf)
        if not spec.fast_scan:  # fast-scan indexes have no polysemous mode
            ivf_pq.do_polysemous_training = False
        ivf.cp.niter = ivf_pq.pq.cp.niter = KMEANS_ITERATIONS
        if spec.coarse == "hnsw":  # k-means assigns through an HNSW graph too: flat assignment is n * nlist * d
            ivf.clustering_index = faiss.IndexHNSWFlat(d, 16)
    if spec.opq:  # OPQ's default 50 iterations over 65k points cost more than the rest of the build
        opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
        opq.niter, opq.max_train_points = 10, 32_768
    return index


def flat_coarse(index: faiss.Index) -> None:
    """Swap an IVF's HNSW coarse quantizer for exact search over the same centroids, in place.

    The graph pays at build time (assigning n vectors to nlist lists); at query time a batch against 4096
    centroids is one BLAS matrix product, which measured half the time of the graph walk at 1M (bench/RESULTS.md),
    and it is exact, so no efSearch to tune. FAISS has no call for this; the IVF takes ownership of the flat
    quantizer (freed with it) and Python of the graph (freed when `graph` goes).
    """
    ivf = faiss.extract_index_ivf(index)
    graph = faiss.downcast_index(ivf.quantizer)
    if not isinstance(graph, faiss.IndexHNSW):
        return
    flat = faiss.IndexFlat(ivf.d, graph.metric_type)
    flat.add(graph.reconstruct_n(0, graph.ntotal))
    ivf.quantizer = flat
    flat.this.disown()
    if ivf.own_fields:
        graph.this.own(True)
    ivf.own_fields = True


def build_shard(spec: IndexSpec, x: np.ndarray, ids: np.ndarray, n_total: int | None = None,
                progress: bool = False) -> faiss.Index:
    """One trained, filled shard of `x` (n, d) float32 with int64 `ids`; `n_total` sizes IVF across all shards.

    `x` may be a memory map: training reads a sample and adding goes ADD_CHUNK rows at a time, so memory
    stays bounded. A `spec.reranks` shard stores row numbers, not ids (see retrieval.full_vectors).
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    d = x.shape[1]
    spec.validate(d)
    n_total = n_total or len(x)
    index = _new_index(spec, d, n_total)
    if not index.is_trained:
        index.train(train_sample(x, spec, n_total))
    stored = np.arange(len(x), dtype=np.int64) if spec.reranks else ids
    with tqdm(total=len(x), desc="add", unit=" vectors", disable=not progress) as bar:
        for i in range(0, len(x), ADD_CHUNK):
            index.add_with_ids(np.ascontiguousarray(x[i : i + ADD_CHUNK], dtype=np.float32), stored[i : i + ADD_CHUNK])
            bar.update(min(ADD_CHUNK, len(x) - i))
    if spec.kind == "ivfpq" and spec.coarse == "hnsw":
        flat_coarse(index)
    configure(index, spec)
    return index


def index_bytes(index: faiss.Index) -> int:
    """RAM an index occupies, measured as its serialized size (codes, ids, lists, centroids, graph)."""
    return int(faiss.serialize_index(index).nbytes)


def gpu_search_available() -> bool:
    """GPU FAISS is installed and sees a GPU: loaded indexes get a search copy there (`_to_gpu`)."""
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """Search copy on all GPUs when GPU FAISS is installed; HNSW and fast-scan IVF-PQ (CPU-only in FAISS) stay on
    the CPU."""
    if not gpu_search_available():
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:  # e.g. HNSW, which FAISS cannot clone to the GPU
        warnings.warn(f"index stays on the CPU: {str(e).splitlines()[0]}", stacklevel=2)
        return index


class ShardedIndex:
    """Shards searched as one (`Retriever`); CPU shards stay the source of truth, GPU copies only search."""

    def __init__(self, spec: IndexSpec, shards: list[faiss.Index], use_gpu: bool = True,
                 full: list[FullVectors] | None = None) -> None:
        if not shards:
            raise RetrievalIndexError("a ShardedIndex needs at least one shard")
        if spec.reranks and (full is None or len(full) != len(shards)):
            raise RetrievalIndexError("an index with rerank needs the full vectors of every shard (FullVectors)")
        self.spec, self.shards, self.use_gpu, self.full = spec, shards, use_gpu, full
        self.d = shards[0].d
        self._rebuild_search()

    def set_search_params(self, **params: int) -> None:
        """Change search knobs (nprobe, refine_k_factor, ef_search) on every shard, as tuning does."""
        for name, value in params.items():
            setattr(self.spec, name, value)
        for s in self.shards:
            configure(s, self.spec)
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
        if not self.spec.reranks:
            return self._search_index.search(q, k)
        # per shard: k * k_factor candidate rows from the PQ codes, re-ranked exactly; then the best k overall
        found = [full.rerank(q, s.search(q, k * self.spec.refine_k_factor)[1], k)
                 for s, full in zip(self._searchers, self.full)]
        if len(found) == 1:
            return found[0]
        scores, ids = np.concatenate([f[0] for f in found], 1), np.concatenate([f[1] for f in found], 1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors to the emptiest shard (keeps shards balanced for parallel search)."""
        if self.spec.reranks:
            raise RetrievalIndexError("an index with rerank cannot add vectors in place; use a full rebuild")
        if len(ids):
            shard = min(self.shards, key=lambda s: s.ntotal)
            shard.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
            self._rebuild_search()

    def remove(self, ids: np.ndarray) -> int:
        """Remove `ids` from every shard; returns how many vectors went. Only for `spec.removable` kinds."""
        if not self.spec.removable:
            flags = [flag for flag in ("refine", "rerank", "fast_scan") if getattr(self.spec, flag)]
            extra = f" with {flags[0]}" if flags else ""
            raise RetrievalIndexError(
                f"index kind '{self.spec.kind}'{extra} cannot remove ids; "
                "use a full refresh (or kind flat / ivfpq without refine, rerank or fast_scan)"
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
            if self.full is not None:
                entries[-1]["full"] = self.full[i].save(Path(folder), path.stem)
        return entries

    def memory_bytes(self) -> int:
        """RAM of the FAISS shards (serialized size); memory-mapped full vectors are not counted."""
        return sum(index_bytes(s) for s in self.shards)


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
    shards, full = [], []
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        files = [(path, entry["sha256"])] + [(folder / f["file"], f["sha256"]) for f in entry.get("full", {}).values()]
        for file, digest in files if verify else []:
            if file_sha256(file) != digest:
                raise RetrievalIndexError(f"{file}: sha256 does not match the manifest; the shard is corrupt, rebuild")
        shards.append(faiss.read_index(str(path)))
        if "full" in entry:
            full.append(FullVectors.open(folder, entry["full"]))
    spec = IndexSpec(**manifest["spec"])  # holds the tuned search parameters (retrieval.tuning)
    for s in shards:
        configure(s, spec)
    return ShardedIndex(spec, shards, use_gpu=use_gpu, full=full or None), manifest


def spec_dict(spec: IndexSpec) -> dict:
    return asdict(spec)
