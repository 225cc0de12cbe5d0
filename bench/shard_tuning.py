"""Per-shard tuned recall vs the recall of the merged (served) index, for a sharded build (issue 21 leftover).

A sharded build used to tune each shard on its own and keep the largest parameters across shards; the
served index searches all shards and merges their top-k. This measures, on clustered vectors split into
`--shards` contiguous shards: each shard's tuned recall, the merged index's recall with the merged
per-shard parameters (against exact search over all vectors), and the parameters that tuning the merged
index itself picks (what retrieval.build does now).

    python bench/shard_tuning.py --n 100000 --shards 2 --threads 1
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from hybrid_pretrain.bench.retrieval import clustered
from hybrid_pretrain.retrieval.auto import choose_spec
from hybrid_pretrain.retrieval.full_vectors import FullVectors
from hybrid_pretrain.retrieval.index import ShardedIndex, build_shard
from hybrid_pretrain.retrieval.tuning import heldout_queries, recall_without_self, tune


def served(index: ShardedIndex, q: np.ndarray, own: np.ndarray, truth_ids: np.ndarray) -> tuple[float, float]:
    """(recall@10, queries/s best of 3) of the index searched as served, all shards merged."""
    return max((recall_without_self(index, q, own, truth_ids, 10) for _ in range(3)), key=lambda r: r[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--order", choices=("random", "sorted"), default="random",
                   help="row order before the contiguous split: random, or sorted by the first coordinate (shards "
                        "hold different regions, like a corpus ordered by topic)")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    x = clustered(args.n, args.d, seed=0)
    if args.order == "sorted":
        x = x[np.argsort(x[:, 0], kind="stable")]
    ids = np.random.default_rng(1).choice(1 << 40, args.n, replace=False).astype(np.int64)
    rows, q, truth = heldout_queries(x, 500, 10, seed=7)  # queries drawn across all shards, exact over all vectors
    own, truth_ids = ids[rows], ids[truth]
    print(f"{args.n} clustered {args.d}-d vectors, {args.order} order, target recall@10 {args.target}")
    print("| shards | spec | per-shard tuned (nprobe, k_factor) | per-shard recall | merged recall, max params "
          "| merged-tuned (nprobe, k_factor) | merged recall, merged-tuned | served q/s max / merged-tuned "
          "| tune s per-shard / merged |")
    for n_shards in args.shards:
        spec = choose_spec(args.n, args.d, args.target)
        parts = np.array_split(np.arange(args.n), n_shards)
        shards = [build_shard(spec, x[r], ids[r], args.n) for r in parts]
        full = [FullVectors(x[r], ids[r]) for r in parts]
        t0 = time.perf_counter()
        per = [tune(ShardedIndex(spec, [s], use_gpu=False, full=[f]), x[r], ids[r], args.target)
               for s, f, r in zip(shards, full, parts)]
        t_per = time.perf_counter() - t0
        params = {k: max(t["params"][k] for t in per) for k in per[0]["params"]}
        merged = ShardedIndex(spec, shards, use_gpu=False, full=full)
        merged.set_search_params(**params)
        before, qps_before = served(merged, q, own, truth_ids)
        t0 = time.perf_counter()
        tuned = tune(merged, x, ids, args.target)
        t_merged = time.perf_counter() - t0
        after, qps_after = served(merged, q, own, truth_ids)
        each = [(t["params"]["nprobe"], t["params"]["refine_k_factor"]) for t in per]
        print(f"| {n_shards} | {spec.factory(args.d, args.n)} + re-rank | {each} -> max {tuple(params.values())} "
              f"| {[t['recall'] for t in per]} | {before:.3f} "
              f"| {tuple(tuned['params'].values())} | {after:.3f} "
              f"| {qps_before:,.0f} / {qps_after:,.0f} (x{qps_after / qps_before:.2f}) "
              f"| {t_per:.1f} / {t_merged:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
