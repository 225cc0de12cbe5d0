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
- PQ codes of d / 4 bytes (1/16 of fp32, plus 8-byte ids): from FAST_SCAN_FROM_DIM dimensions (encoder
  embeddings) d / 2 four-bit sub-codes scanned by FAISS's fast scan (PQ<m>x4fs), below it, or where GPU FAISS is
  installed (it has no fast scan), d / 4 eight-bit ones.
  Encoder embeddings spread a passage's neighbours over many lists, so tuning asks for a large nprobe and
  scanning codes is most of a query: on 29,720 MiniLM passages, both tuned to recall 0.95, the fast-scan index
  ran 10,110 q/s against 4,784 for the 8-bit one with OPQ (2.1x, one run) and built in 15 s instead
  of 294 s (bench/RESULTS.md). On the clustered 128-d benchmark few lists are probed and the exact re-rank
  dominates, where 8-bit codes, which need half the re-ranked candidates, measured faster (x19.0 vs x14.9
  flat's q/s at 200k);
- with 8-bit codes, an OPQ rotation before PQ from 256 dimensions on (encoder embeddings spread variance
  unevenly over dimensions, which OPQ balances across sub-quantizers; at 128-d its training time is not
  repaid). Not with fast scan: OPQ trains an 8-bit PQ of its own inside, 95% of a 334 s build on 29,720
  MiniLM vectors, for ~20% more queries/s (12,673 vs 10,255 in one run);
- exact re-ranking of the PQ candidates from full vectors memory-mapped from disk (retrieval.full_vectors):
  32-byte codes alone do not reach recall 0.95, RAM-resident full vectors would break the 1/8 memory budget.
Search parameters (nprobe, k_factor) are then tuned to the target recall (retrieval.tuning).
"""

from __future__ import annotations

import math
from dataclasses import replace

from hybrid_pretrain.retrieval.index import IndexSpec, gpu_search_available

FLAT_BELOW = 20_000
HNSW_COARSE_FROM = 4096
OPQ_FROM_DIM = 256
FAST_SCAN_FROM_DIM = 256


def auto_nlist(n: int) -> int:
    """The smallest power of two >= 4 * sqrt(n), with at least 39 vectors per list (FAISS's k-means minimum)."""
    nlist = 2 ** math.ceil(math.log2(4 * math.sqrt(max(n, 1))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def choose_spec(n: int, d: int, target_recall: float = 0.95, flat_below: int = FLAT_BELOW,
                fast_scan: bool | None = None) -> IndexSpec:
    """The index for `n` vectors of dimension `d`: flat when small, else IVF-PQ with on-disk re-ranking.

    `fast_scan` None: 4-bit fast-scan codes from FAST_SCAN_FROM_DIM dimensions when searches run on the CPU, 8-bit
    PQ where GPU FAISS is installed (FAISS has no GPU fast scan, and the GPU scans 8-bit codes fast); False forces
    8-bit PQ (the choice before fast scan, kept for comparison), True fast scan wherever the dimension rule allows it
    (from FAST_SCAN_FROM_DIM), GPU or not."""
    if n < flat_below:
        return IndexSpec("flat", target_recall=target_recall)
    if fast_scan is None:
        fast_scan = not gpu_search_available()
    nlist = auto_nlist(n)
    if fast_scan and d >= FAST_SCAN_FROM_DIM and d % 2 == 0:  # d / 2 four-bit codes: d / 4 bytes, as 8-bit PQ d / 4
        m, bits, opq = d // 2, 4, False
    else:
        m, bits, opq = next(m for m in (d // 4, d // 2, d) if m and d % m == 0), 8, d >= OPQ_FROM_DIM
    return IndexSpec("ivfpq", nlist=nlist, pq_m=m, pq_bits=bits, fast_scan=bits == 4,
                     coarse="hnsw" if nlist >= HNSW_COARSE_FROM else "flat", opq=opq, rerank=True,
                     refine_k_factor=4, nprobe=16, target_recall=target_recall)


def resolve_spec(spec: IndexSpec, n: int, d: int) -> tuple[IndexSpec, dict]:
    """`spec` itself, or the automatic choice when its kind is auto; and the record the manifest keeps."""
    chosen = choose_spec(n, d, spec.target_recall) if spec.kind == "auto" else replace(spec)
    chosen.validate(d)
    record = {"requested": spec.kind, "kind": chosen.kind, "n": n, "d": d, "factory": chosen.factory(d, n)}
    return chosen, record
