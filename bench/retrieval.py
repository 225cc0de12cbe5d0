"""Retrieval benchmark: FAISS flat vs IVF-PQ (+ exact re-rank) vs HNSW, and the HTTP service vs in-process search.

    python bench/retrieval.py                       # 100k and 1M clustered 128-d vectors
    python bench/retrieval.py --sizes 100000 --dim 384

Data is a Gaussian mixture, unit-normalised (i.i.d. random vectors make every ANN index look useless).
Prints build time, recall@10 against exact search and queries/s per index, with ratios to flat, then
service latency p50/p99 at batch 1 and 32 next to the same searches in-process.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from hybrid_pretrain.retrieval.client import IndexClient
from hybrid_pretrain.retrieval.index import IndexSpec, ShardedIndex, build_shard
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.service import IndexServer

K = 10


def clustered(n: int, d: int, seed: int, clusters: int = 1000, spread: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(12345).normal(size=(clusters, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 100_000):  # chunked: bounded temporaries at 1M x 384
        m = min(100_000, n - i)
        x = centers[rng.integers(0, clusters, m)] + spread * rng.normal(size=(m, d)).astype(np.float32)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def specs(d: int) -> dict[str, IndexSpec]:
    return {
        "flat": IndexSpec("flat"),
        "ivfpq": IndexSpec("ivfpq", nlist=1024, pq_m=d // 4, nprobe=32),
        "ivfpq+refine": IndexSpec("ivfpq", nlist=1024, pq_m=d // 4, nprobe=32, refine=True, refine_k_factor=10),
        "hnsw": IndexSpec("hnsw", hnsw_m=32, ef_construction=40, ef_search=128),
    }


def bench_indexes(n: int, d: int, n_queries: int, kinds: list[str]) -> ShardedIndex:
    x, q = clustered(n, d, seed=0), clustered(n_queries, d, seed=1)
    ids = np.arange(n, dtype=np.int64)
    rows, flat = [], None
    truth = None
    for name in kinds:
        spec = specs(d)[name]
        t0 = time.perf_counter()
        index = ShardedIndex(spec, [build_shard(spec, x, ids)], use_gpu=False)
        build = time.perf_counter() - t0
        index.search(q[:10], K)  # warm-up
        t0 = time.perf_counter()
        _, found = index.search(q, K)
        qps = n_queries / (time.perf_counter() - t0)
        if truth is None:  # the first kind is flat: exact ground truth
            truth, flat = found, index
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
        rows.append((name, build, recall, qps))
        print(f"  {n:>9,} {name:<13} build {build:8.2f} s   recall@10 {recall:.3f}   {qps:10,.0f} q/s", flush=True)
    base_build, base_qps = rows[0][1], rows[0][3]
    for name, build, recall, qps in rows[1:]:
        print(f"  {n:>9,} {name:<13} vs flat: build x{build / base_build:.1f}, q/s x{qps / base_qps:.1f}, "
              f"recall {recall:.3f}")
    return flat


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)) * 1e3, float(np.percentile(samples, 99)) * 1e3


def bench_service(index: ShardedIndex, d: int, reps: int) -> None:
    live = LiveIndex(index=index)
    with IndexServer(live, max_wait_ms=0.0) as server:
        client = IndexClient(server.url)
        for batch in (1, 32):
            q = clustered(batch * reps, d, seed=2)
            client.search(q[:batch], K)
            lat = {"in-process": [], "service": []}
            for i in range(reps):
                qb = q[i * batch : (i + 1) * batch]
                for name, fn in (("in-process", index.search), ("service", client.search)):
                    t0 = time.perf_counter()
                    fn(qb, K)
                    lat[name].append(time.perf_counter() - t0)
            (p50a, p99a), (p50b, p99b) = percentiles(lat["in-process"]), percentiles(lat["service"])
            print(f"  batch {batch:>2}: in-process p50 {p50a:7.2f} ms p99 {p99a:7.2f} ms | service p50 {p50b:7.2f} ms "
                  f"p99 {p99b:7.2f} ms | service/in-process p50 x{p50b / p50a:.2f}, p99 x{p99b / p99a:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated vector counts")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--kinds", default="flat,ivfpq,ivfpq+refine,hnsw", help="flat must come first")
    p.add_argument("--service-reps", type=int, default=200, help="requests per batch size in the latency test")
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: FAISS's default)")
    args = p.parse_args(argv)
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)  # on a shared, loaded machine spinning OpenMP threads thrash
    kinds = args.kinds.split(",")
    if kinds[0] != "flat":
        print("error: --kinds must start with flat (it is the recall ground truth)", file=sys.stderr)
        return 2
    print(f"FAISS indexes, clustered {args.dim}-d vectors, {args.queries} queries, k={K}")
    first = None
    for n in (int(s) for s in args.sizes.split(",")):
        flat = bench_indexes(n, args.dim, args.queries, kinds)
        first = first or flat
    print(f"index service (HTTP, loopback, binary payload) vs in-process, flat index of {first.ntotal:,}")
    bench_service(first, args.dim, args.service_reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
