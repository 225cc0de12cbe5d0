"""Index choice by corpus size and dimension (`kind: auto`), recorded in the manifest by the builder.

The rules, and why:
- under FLAT_BELOW vectors, exact search: it is a few milliseconds a query and recall is 1.0;
- above, IVF-PQ with the smallest power of two from 4 * sqrt(n) lists, so inside FAISS's 4-16 * sqrt(n)
  guidance (the nearest power of two fell to 3.2 * sqrt(n) at 100k; on 101k MiniLM passages 2048 vs 1024
  lists measured the same within noise, x2.1-2.3 flat's q/s at recall 0.955-0.957, bench/RESULTS.md); the
  low end of the range keeps k-means training inside the build budget on a small CPU (1M: 4096 either way);
- from HNSW_COARSE_FROM lists, an HNSW graph over the centroids as the coarse quantizer (and for k-means
  assignment), since flat assignment costs n * nlist * d at add time (1M x 4096 x 128: minutes on 2 cores);
  once built, searches go through exact centroid search again (retrieval.index.flat_coarse): for a batch of
  queries that is one matrix product, faster than the graph walk;
- PQ with d / 4 sub-quantizers of 8 bits (32 bytes at 128-d, 96 at 384-d: 1/16 of fp32, plus 8-byte ids);
- an OPQ rotation before PQ from 256 dimensions on: encoder embeddings spread variance unevenly over
  dimensions, which OPQ balances across sub-quantizers; at 128-d its training time is not repaid;
- exact re-ranking of the PQ candidates from full vectors memory-mapped from disk (retrieval.full_vectors):
  32-byte codes alone do not reach recall 0.95, RAM-resident full vectors would break the 1/8 memory budget.
Search parameters (nprobe, k_factor) are then tuned to the target recall (retrieval.tuning).
"""

from __future__ import annotations

import math
from dataclasses import replace

from hybrid_pretrain.retrieval.index import IndexSpec

FLAT_BELOW = 20_000
HNSW_COARSE_FROM = 4096
OPQ_FROM_DIM = 256


def auto_nlist(n: int) -> int:
    """The smallest power of two >= 4 * sqrt(n), with at least 39 vectors per list (FAISS's k-means minimum)."""
    nlist = 2 ** math.ceil(math.log2(4 * math.sqrt(max(n, 1))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def choose_spec(n: int, d: int, target_recall: float = 0.95, flat_below: int = FLAT_BELOW) -> IndexSpec:
    """The index for `n` vectors of dimension `d`: flat when small, else IVF-PQ with on-disk re-ranking."""
    if n < flat_below:
        return IndexSpec("flat", target_recall=target_recall)
    nlist = auto_nlist(n)
    m = next(m for m in (d // 4, d // 2, d) if m and d % m == 0)
    return IndexSpec("ivfpq", nlist=nlist, pq_m=m, pq_bits=8, coarse="hnsw" if nlist >= HNSW_COARSE_FROM else "flat",
                     opq=d >= OPQ_FROM_DIM, rerank=True, refine_k_factor=4, nprobe=16, target_recall=target_recall)


def resolve_spec(spec: IndexSpec, n: int, d: int) -> tuple[IndexSpec, dict]:
    """`spec` itself, or the automatic choice when its kind is auto; and the record the manifest keeps."""
    chosen = choose_spec(n, d, spec.target_recall) if spec.kind == "auto" else replace(spec)
    chosen.validate(d)
    record = {"requested": spec.kind, "kind": chosen.kind, "n": n, "d": d, "factory": chosen.factory(d, n)}
    return chosen, record
