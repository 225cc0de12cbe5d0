"""Embed a passage store and publish an index version: full builds sharded across ranks, incremental refreshes.

Each version folder also holds `indexed.npz`: the ids, text digests and encoder (an index into the
manifest's `encoders` list) of every indexed passage. That is what lets an incremental refresh find
what changed in the corpus, and which passages were embedded by a stale encoder, without the old store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from hybrid_pretrain.retrieval.auto import resolve_spec
from hybrid_pretrain.retrieval.build_lock import BuildLock, clear_leftovers
from hybrid_pretrain.retrieval.errors import RetrievalIndexError
from hybrid_pretrain.retrieval.full_vectors import FullVectors
from hybrid_pretrain.retrieval.index import (
    IndexSpec,
    ShardedIndex,
    build_shard,
    current_version,
    load_index,
    publish,
    read_manifest,
    spec_dict,
    staging_dir,
    version_dir,
)
from hybrid_pretrain.retrieval.passages import PassageStore, diff_passages
from hybrid_pretrain.retrieval.protocol import Embedder
from hybrid_pretrain.retrieval.tuning import tune

EMBED_CHUNK = 1024  # passages read and embedded per step: bounds memory for the text, not for the vectors


def embed_rows(store: PassageStore, embedder: Embedder, rows: np.ndarray, progress: bool = True,
               desc: str = "embed", out: np.ndarray | None = None) -> np.ndarray:
    """float32 (len(rows), dim) embeddings of the given store rows, a chunk of texts at a time, into `out`
    when given (e.g. a memory-mapped .npy, so a large corpus never sits in RAM whole)."""
    out = np.zeros((len(rows), embedder.dim), dtype=np.float32) if out is None else out
    with tqdm(total=len(rows), desc=desc, unit=" passages", disable=not progress) as bar:
        for i in range(0, len(rows), EMBED_CHUNK):
            chunk = rows[i : i + EMBED_CHUNK]
            out[i : i + len(chunk)] = embedder.embed(store.texts(chunk))
            bar.update(len(chunk))
    return out


def _default_barrier() -> Callable[[], None]:
    if dist.is_available() and dist.is_initialized():
        return dist.barrier
    return lambda: None


def _from_rank0(value: object, world_size: int) -> object:
    """Rank 0's `value` on every rank (a broadcast when a process group is up; else `value` itself)."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _lock_and_choose_version(index_dir: Path) -> tuple[BuildLock | None, int | str]:
    """Rank 0: take the build lock, clear a crashed builder's leftovers and pick the next version number;
    (None, the reason) when another builder holds the folder."""
    lock = BuildLock(index_dir)
    try:
        lock.acquire()
    except RetrievalIndexError as e:
        return None, str(e)
    current = current_version(index_dir)
    clear_leftovers(index_dir, current)
    return lock, (current or 0) + 1


def store_info(store: PassageStore) -> dict:
    """The passage store a manifest was built from."""
    return {"path": str(store.path.resolve()), "passages": len(store)}


def build_full(
    store: PassageStore,
    embedder: Embedder,
    index_dir: str | Path,
    spec: IndexSpec,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> dict:
    """Embed every passage and publish a new version; rank r builds shard r from its contiguous slice of rows.

    Every rank calls this with the same arguments (all see `index_dir`, e.g. on a shared filesystem);
    shards are independent indexes (each trains its own IVF), so no vectors cross ranks. Rank 0 holds the
    folder's build lock throughout; when another builder has it, every rank raises the same
    RetrievalIndexError. Returns the manifest.
    """
    barrier = barrier or _default_barrier()
    index_dir = Path(index_dir)
    lock, outcome = _lock_and_choose_version(index_dir) if rank == 0 else (None, None)
    outcome = _from_rank0(outcome, world_size)
    if isinstance(outcome, str):
        raise RetrievalIndexError(outcome)
    # Nobody writes into the staging folder before rank 0 has cleared a crashed builder's leftovers there.
    barrier()
    version = outcome if outcome is not None else (current_version(index_dir) or 0) + 1  # no process group
    try:
        return _build_version(store, embedder, index_dir, spec, int(version), rank, world_size, barrier, progress)
    finally:
        if lock is not None:
            lock.release()


def _build_version(store: PassageStore, embedder: Embedder, index_dir: Path, spec: IndexSpec, version: int,
                   rank: int, world_size: int, barrier: Callable[[], None], progress: bool) -> dict:
    stage = staging_dir(index_dir, version)
    stage.mkdir(parents=True, exist_ok=True)
    rows = np.array_split(np.arange(len(store)), world_size)[rank]
    if len(rows) == 0:
        raise ValueError(f"passage store {store.path} has {len(store)} passages, fewer than the {world_size} ranks")
    spec, choice = resolve_spec(spec, len(store), embedder.dim)  # the same choice on every rank
    vectors_file = stage / f"shard_{rank:05d}.vectors.npy"  # embeddings go to disk, not RAM
    x = np.lib.format.open_memmap(vectors_file, mode="w+", dtype=np.float32, shape=(len(rows), embedder.dim))
    embed_rows(store, embedder, rows, progress and rank == 0, desc=f"embed (rank {rank})", out=x)
    x.flush()
    shard_ids = np.asarray(store.ids)[rows]
    index = _build_index(spec, [x], [shard_ids], len(store), progress and rank == 0)
    [entry] = index.save_shards(stage, first=rank)
    del x, index  # the memory map, before the file goes (Windows-safe; harmless elsewhere)
    if not spec.reranks and not spec.target_recall:
        vectors_file.unlink()  # else rank 0 reads every shard's vectors for tuning first
    (stage / f"shard_{rank:05d}.json").write_text(json.dumps({"entry": entry}))
    barrier()
    manifest: dict = {}
    if rank == 0:
        entries = [json.loads((stage / f"shard_{r:05d}.json").read_text())["entry"] for r in range(world_size)]
        for r in range(world_size):
            (stage / f"shard_{r:05d}.json").unlink()
        tuning = _tune_merged(stage, spec, entries, np.asarray(store.ids)) if spec.target_recall else None
        if not spec.reranks and spec.target_recall:
            for r in range(world_size):
                (stage / f"shard_{r:05d}.vectors.npy").unlink()
        np.savez(stage / "indexed.npz", ids=np.asarray(store.ids), digests=np.asarray(store.digests),
                 encoder=np.zeros(len(store), np.int16))
        manifest = {
            "spec": spec_dict(spec), "dim": embedder.dim, "metric": "inner_product", "refresh": "full",
            "parent": None, "ntotal": sum(e["ntotal"] for e in entries), "shards": entries,
            "encoder_sha256": embedder.fingerprint, "encoders": [embedder.fingerprint],
            "encoder_counts": {embedder.fingerprint: len(store)}, "passage_store": store_info(store),
            "choice": choice,
        }
        if tuning:
            manifest["tuning"] = tuning
            manifest["spec"].update(tuning["params"])
        publish(index_dir, version, manifest)
    barrier()
    return read_manifest(index_dir, version)


def refresh_incremental(
    index_dir: str | Path,
    store: PassageStore,
    embedder: Embedder,
    reembed_ids: np.ndarray | None = None,
    progress: bool = True,
) -> dict:
    """Publish a new version that matches `store` by removing and adding only what changed.

    Passages that left the store go, new or edited ones are embedded and added, and `reembed_ids`
    (e.g. the stalest passages, see `stale_ids`) are re-embedded with `embedder`. Runs on one process;
    needs a removable index kind (flat, or IVF-PQ without refine, rerank or fast scan). Returns the new manifest.
    """
    index_dir = Path(index_dir)
    with BuildLock(index_dir):
        clear_leftovers(index_dir, current_version(index_dir))
        return _refresh_version(index_dir, store, embedder, reembed_ids, progress)


def _refresh_version(index_dir: Path, store: PassageStore, embedder: Embedder, reembed_ids: np.ndarray | None,
                     progress: bool) -> dict:
    index, old = load_index(index_dir, use_gpu=False)
    prev = np.load(version_dir(index_dir, old["version"]) / "indexed.npz")
    ids, digests, enc_idx = prev["ids"], prev["digests"], prev["encoder"]
    remove, add_rows = diff_passages(ids, digests, store)
    if reembed_ids is not None and len(reembed_ids):
        rows = store.rows_of(reembed_ids)
        rows = rows[rows >= 0]
        remove = np.union1d(remove, np.asarray(store.ids)[rows])
        add_rows = np.union1d(add_rows, rows)
    index.remove(remove)
    x = embed_rows(store, embedder, add_rows, progress, desc="re-embed")
    index.add(x, np.asarray(store.ids)[add_rows])

    encoders = list(old["encoders"])
    if embedder.fingerprint not in encoders:
        encoders.append(embedder.fingerprint)
    keep = ~np.isin(ids, remove)
    new_ids = np.concatenate([ids[keep], np.asarray(store.ids)[add_rows]])
    new_digests = np.concatenate([digests[keep], np.asarray(store.digests)[add_rows]])
    new_enc = np.concatenate([enc_idx[keep], np.full(len(add_rows), encoders.index(embedder.fingerprint), np.int16)])

    version = old["version"] + 1
    stage = staging_dir(index_dir, version)
    stage.mkdir(parents=True, exist_ok=True)
    np.savez(stage / "indexed.npz", ids=new_ids, digests=new_digests, encoder=new_enc)
    counts = {fp: int((new_enc == i).sum()) for i, fp in enumerate(encoders) if (new_enc == i).any()}
    manifest = {
        **{k: old[k] for k in ("spec", "dim", "metric")}, "refresh": "incremental", "parent": old["version"],
        "ntotal": index.ntotal, "shards": index.save_shards(stage), "encoder_sha256": embedder.fingerprint,
        "encoders": encoders, "encoder_counts": counts, "passage_store": store_info(store),
        "changes": {"removed": int(len(remove)), "added": int(len(add_rows))},
    }
    publish(index_dir, version, manifest)
    return read_manifest(index_dir, version)


def stale_ids(index_dir: str | Path, fingerprint: str, limit: int) -> np.ndarray:
    """Up to `limit` indexed passage ids not embedded by the encoder `fingerprint`, oldest encoder first."""
    manifest = read_manifest(index_dir)
    prev = np.load(version_dir(index_dir, manifest["version"]) / "indexed.npz")
    fresh = manifest["encoders"].index(fingerprint) if fingerprint in manifest["encoders"] else -1
    stale = np.flatnonzero(prev["encoder"] != fresh)
    order = np.argsort(prev["encoder"][stale], kind="stable")
    return prev["ids"][stale[order][:limit]]


def build_from_vectors(index_dir: str | Path, spec: IndexSpec, x: np.ndarray, ids: np.ndarray, shards: int = 1,
                       info: dict | None = None, progress: bool = False) -> dict:
    """Publish precomputed vectors `x` (n, d) with int64 `ids` as the next version, split into `shards`.

    For embeddings made elsewhere (and the service's tests and load benchmark); one process, under the
    folder's build lock. `info` adds keys to the manifest. A spec of kind auto is chosen by size
    (retrieval.auto); with `spec.target_recall` the search parameters are tuned on all shards together
    (retrieval.tuning). Returns the manifest.
    """
    index_dir = Path(index_dir)
    with BuildLock(index_dir):
        current = current_version(index_dir)
        clear_leftovers(index_dir, current)
        version = (current or 0) + 1
        stage = staging_dir(index_dir, version)
        stage.mkdir(parents=True)
        spec, choice = resolve_spec(spec, len(x), int(x.shape[1]))
        parts = np.array_split(np.arange(len(x)), shards)
        index = _build_index(spec, [x[p[0] : p[-1] + 1] for p in parts], [ids[p] for p in parts], len(x), progress)
        tuning = tune(index, x, ids, spec.target_recall) if spec.target_recall else None
        manifest = {"spec": spec_dict(index.spec), "dim": int(x.shape[1]), "metric": "inner_product",
                    "refresh": "full", "ntotal": index.ntotal, "shards": index.save_shards(stage), "choice": choice,
                    **({"tuning": tuning} if tuning else {}), **(info or {})}
        publish(index_dir, version, manifest)
    return read_manifest(index_dir, version)


def _build_index(spec: IndexSpec, xs: list[np.ndarray], ids: list[np.ndarray], n_total: int,
                 progress: bool) -> ShardedIndex:
    """Shards built from `xs` (arrays or memory maps) with `ids`; re-ranking specs keep them as FullVectors."""
    shards = [build_shard(spec, x, i, n_total, progress) for x, i in zip(xs, ids)]
    full = [FullVectors(x, i) for x, i in zip(xs, ids)] if spec.reranks else None
    return ShardedIndex(spec, shards, use_gpu=False, full=full)


def _tune_merged(stage: Path, spec: IndexSpec, entries: list[dict], ids: np.ndarray) -> dict:
    """Tune the search parameters on every shard of the staged version searched together, as it is served.

    Tuning shards apart misses the merge: each shard's top-k (re-ranked from its own k * k_factor candidates)
    competes for the merged top-k, so the served recall differs from every shard's (bench/shard_tuning.py).
    Queries are held-out passages of all shards, their truth exact search over all vectors (`ids` in shard order).
    """
    vectors = [np.load(stage / f"shard_{r:05d}.vectors.npy", mmap_mode="r") for r in range(len(entries))]
    shards = [faiss.read_index(str(stage / e["file"])) for e in entries]
    full = [FullVectors.open(stage, e["full"]) for e in entries] if spec.reranks else None
    index = ShardedIndex(replace(spec), shards, use_gpu=False, full=full)  # tuning sets the knobs on its own copy
    tuning = tune(index, vectors, ids, spec.target_recall)
    del index, full, vectors  # the memory maps, before the vectors files may go
    return tuning
