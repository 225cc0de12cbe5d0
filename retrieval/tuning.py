"""Search parameters tuned to a recall target at build time, with passages of the corpus as held-out queries.

A sample of the indexed vectors serves as queries; their exact neighbours (flat search over all vectors,
in chunks, the query's own row left out) are the truth. The sweep walks nprobe (IVF) or efSearch (HNSW)
upwards (powers of two and the midpoints between) for each re-rank factor and keeps, of the points that
reach the target, the one with the most queries/s; when none does, the one with the best recall, with a
warning and `reached: false` recorded. The result goes into the spec (so into the manifest), which
`load_index` applies for the service and in-process search alike. FAISS's `ParameterSpace.explore` is
not used because the on-disk re-rank factor (retrieval.full_vectors) lives outside FAISS;
the knobs are still set through `ParameterSpace`.
"""

from __future__ import annotations

import time
import warnings

import faiss
import numpy as np

from hybrid_pretrain.retrieval.index import ShardedIndex, check_target_recall

TRUTH_CHUNK = 131_072  # database rows per exact-search step: bounds the temporaries of the ground truth
K_FACTORS = (1, 2, 3, 4, 6, 8, 12, 14, 16, 24, 32, 48, 64)
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)
SATURATED = 0.002  # a doubling of nprobe that gains less recall than this: more probes will not help
MARGIN = 0.01  # asked of the held-out queries above the target: 500 queries measure recall to about +-0.01


def _blocks(x: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _gather(blocks: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """float32 copies of the (sorted) global `rows` of row blocks stacked in order."""
    starts = np.cumsum([0] + [len(b) for b in blocks])
    return np.concatenate([np.asarray(b[rows[(rows >= lo) & (rows < hi)] - lo], dtype=np.float32)
                           for b, lo, hi in zip(blocks, starts[:-1], starts[1:])])


def heldout_queries(x: np.ndarray | list[np.ndarray], n_queries: int, k: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query rows (q,), the query vectors (q, d) float32, their exact top-k rows (q, k) excluding themselves)
    for `x` (n, d), a memory map too, or a list of row blocks (e.g. every shard's vectors file, in shard order)
    read as one (n, d) array. The vectors come back so callers never gather the rows a second time."""
    blocks = _blocks(x)
    n = sum(len(b) for b in blocks)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False))
    q = _gather(blocks, rows)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    offset = 0
    for block in blocks:
        for start in range(0, len(block), TRUTH_CHUNK):
            chunk = np.ascontiguousarray(block[start : start + TRUTH_CHUNK], dtype=np.float32)
            s, i = faiss.knn(q, chunk, min(k + 1, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + offset + start], 1)
            top = np.argsort(-best_s, axis=1, kind="stable")[:, : k + 1]
            best_s, best_i = np.take_along_axis(best_s, top, 1), np.take_along_axis(best_i, top, 1)
        offset += len(block)
    truth = np.array([[r for r in row if r != own][:k] for row, own in zip(best_i, rows)])
    return rows, q, truth


def recall_without_self(index: ShardedIndex, q: np.ndarray, own_ids: np.ndarray, truth_ids: np.ndarray,
                        k: int) -> tuple[float, float]:
    """(recall@k, queries/s) of `index` on `q`, each query's own id dropped from its results."""
    t0 = time.perf_counter()
    _, found = index.search(q, k + 1)
    qps = len(q) / max(time.perf_counter() - t0, 1e-9)
    hits = [len(set([f for f in row if f != own][:k]) & set(t)) for row, own, t in zip(found, own_ids, truth_ids)]
    return float(np.sum(hits) / truth_ids.size), qps


def _grid(index: ShardedIndex) -> list[list[dict]]:
    """Candidate settings: one list per re-rank factor, in the order to walk (cheapest first)."""
    spec = index.spec
    if spec.kind == "hnsw":
        return [[{"ef_search": ef} for ef in EF_SEARCH]]
    nlist = max(faiss.extract_index_ivf(s).nlist for s in index.shards)
    # powers of two and the midpoints between (3 * 2^i): list scanning dominates the search, and at 1M the target
    # often falls between two powers of two (nprobe 6 scans a quarter fewer codes than 8)
    probes = sorted({p for i in range(20) for p in (2**i, 3 * 2**i) if p < nlist}) + [nlist]
    factors = K_FACTORS if (spec.refine or spec.reranks) else (spec.refine_k_factor,)
    return [[{"nprobe": p, "refine_k_factor": f} for p in probes] for f in factors]


def tune(index: ShardedIndex, x: np.ndarray | list[np.ndarray], ids: np.ndarray, target: float, k: int = 10,
         n_queries: int = 500, seed: int = 0) -> dict:
    """Set the fastest search parameters of `index` (built from `x` with `ids`) that reach recall@k `target`.

    `x` is every vector of the index (a list of row blocks, e.g. its shards' vectors in order, counts as one
    array), so the queries come from all shards and their truth is exact search over all vectors; recall is
    measured on `index` searched as served: its shards together, top-k merged. Returns the record the
    manifest keeps: target, reached `recall` (of the `shards` searched together, as served), queries/s, the
    parameters and whether the target was reached. (Manifests written before kept a copy of `recall` as
    `merged_recall`; nothing reads it, so they load as they are.) A flat index is exact and is left as it is.
    """
    check_target_recall(target)
    if index.spec.kind == "flat":
        return {"target": target, "k": k, "recall": 1.0, "shards": len(index.shards),
                "reached": True, "params": {}}
    rows, q, truth = heldout_queries(x, n_queries, k, seed)
    own, truth_ids = ids[rows], ids[truth]
    points, best_reached, need = [], None, min(target + MARGIN, 1.0)
    for line in _grid(index):
        previous = -1.0
        for params in line:
            if best_reached and params.get("nprobe", 0) > best_reached["params"].get("nprobe", 1 << 30):
                break  # a larger re-rank factor never needs more probes than a smaller one that reached the target
            index.set_search_params(**params)
            recall, qps = recall_without_self(index, q, own, truth_ids, k)
            points.append({"params": params, "recall": round(recall, 4), "qps": round(qps, 1)})
            if recall >= need:
                if best_reached is None or qps > best_reached["qps"]:
                    best_reached = points[-1]
                break
            if recall - previous < SATURATED:
                break
            previous = recall
    best = best_reached or max(points, key=lambda p: (p["recall"], p["qps"]))
    index.set_search_params(**best["params"])
    if best_reached is None:
        warnings.warn(f"index tuning: recall@{k} target {target} not reached; best {best['recall']:.3f} with "
                      f"{best['params']} (a larger index: more lists, bigger PQ codes, or kind hnsw/flat)",
                      stacklevel=2)
    return {"target": target, "k": k, "queries": len(rows), "recall": best["recall"], "shards": len(index.shards),
            "qps": best["qps"], "reached": best_reached is not None, "params": best["params"], "points": points}
