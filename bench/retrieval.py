"""Retrieval benchmark: flat vs the auto-chosen, auto-tuned index (and fixed IVF-PQ / HNSW), and the service.

    python bench/retrieval.py --threads 1                       # 100k and 1M clustered 128-d vectors
    python bench/retrieval.py --sizes 100000 --kinds flat,auto,ivfpq,ivfpq+refine,hnsw
    python bench/retrieval.py --sizes 0 --corpus ../shared/data/pg19_sample --real-n 20000 --cache /tmp/real
                                                                # MiniLM embeddings of real passages
    python bench/retrieval.py --sizes 0 --corpus A,B --real-n 0 --passage-words 50 --cache /tmp/real
                                                                # all 50-word passages; resumable encode

Clustered data is a Gaussian mixture, unit-normalised (i.i.d. random vectors make every ANN index look
useless); real data is all-MiniLM-L6-v2 embeddings of corpus passages, queries drawn from held-out
passages (not indexed). `auto` is what `launcher/build_index.py` builds by default: the index chosen
from n and d (retrieval.auto), its search parameters tuned at build time to --target-recall on passages
of the set (retrieval.tuning), published and loaded back (full vectors memory-mapped). Prints build time,
recall@10 against exact search, queries/s (best of 3 passes over the queries), index memory, with
ratios to flat; then the service's latency next to in-process search on the auto index, and whether
both return the same ids. The last line sums up the auto index on the largest clustered set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hybrid_pretrain.retrieval.auto import FLAT_BELOW, choose_spec
from hybrid_pretrain.retrieval.build import build_from_vectors
from hybrid_pretrain.retrieval.client import IndexClient
from hybrid_pretrain.retrieval.config import WORDS_PER_PASSAGE
from hybrid_pretrain.retrieval.index import IndexSpec, ShardedIndex, build_shard, load_index
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.passages import PassageStore, build_passage_store
from hybrid_pretrain.retrieval.service import IndexServer

K = 10
REPEATS = 3


def clustered(n: int, d: int, seed: int, clusters: int = 1000, spread: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(12345).normal(size=(clusters, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 100_000):  # chunked: bounded temporaries at 1M x 384
        m = min(100_000, n - i)
        x = centers[rng.integers(0, clusters, m)] + spread * rng.normal(size=(m, d)).astype(np.float32)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


AUTO_KINDS = ("auto", "auto-ivf", "auto-pq8", "auto-ivf-pq8")


def specs(d: int) -> dict[str, IndexSpec]:
    return {
        "flat": IndexSpec("flat"),
        "ivfpq": IndexSpec("ivfpq", nlist=1024, pq_m=d // 4, nprobe=32),
        "ivfpq+refine": IndexSpec("ivfpq", nlist=1024, pq_m=d // 4, nprobe=32, refine=True, refine_k_factor=10),
        "hnsw": IndexSpec("hnsw", hnsw_m=32, ef_construction=40, ef_search=128),
    }


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def build_auto(x: np.ndarray, target: float, folder: Path, flat_below: int = FLAT_BELOW,
               fast_scan: bool | None = None) -> tuple[ShardedIndex, dict]:
    """Publish the auto index of `x` into `folder` (as the launcher does) and load it back; `fast_scan` False
    builds the 8-bit PQ the auto choice made before fast-scan codes, for a side-by-side comparison."""
    if flat_below == FLAT_BELOW and fast_scan is None:  # exactly what the launcher asks for
        spec = IndexSpec("auto", target_recall=target)
    else:
        spec = choose_spec(len(x), x.shape[1], target, flat_below, fast_scan)
    build_from_vectors(folder, spec, x, np.arange(len(x), dtype=np.int64), progress=True)
    return load_index(folder, use_gpu=False)


def bench_indexes(label: str, x: np.ndarray, q: np.ndarray, kinds: list[str], target: float,
                  workdir: Path) -> tuple[ShardedIndex | None, dict | None]:
    """One table block for data set `x` with queries `q`; returns the auto index (if built) and its summary."""
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64)
    rows, truth, auto, auto_cpu, summary = [], None, None, 0.0, None
    for name in kinds:
        t0, cpu0 = time.perf_counter(), time.process_time()
        if name in AUTO_KINDS:  # auto-ivf: the auto IVF choice even below FLAT_BELOW (small real sets); -pq8: 8-bit PQ
            flat_below = 0 if name.startswith("auto-ivf") else FLAT_BELOW
            fast_scan = False if name.endswith("-pq8") else None  # None: auto's own choice
            index, manifest = build_auto(x, target, workdir / f"{label}_{name}", flat_below, fast_scan)
        else:
            spec = specs(d)[name]
            index, manifest = ShardedIndex(spec, [build_shard(spec, x, ids)], use_gpu=False), None
        build, build_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        qps, found = 0.0, None
        for _ in range(REPEATS):  # best of a few passes: the first one also pages in memory-mapped vectors
            t0 = time.perf_counter()
            _, found = index.search(q, K)
            qps = max(qps, len(q) / (time.perf_counter() - t0))
        if truth is None:  # the first kind is flat: exact ground truth
            truth = found
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
        mem = index.memory_bytes()
        rows.append((name, build, recall, qps, mem))
        what = ""
        if manifest is not None:
            tuned = manifest.get("tuning", {})
            what = (f"   [{manifest['choice']['factory']}{', rerank from disk' if index.spec.reranks else ''}; "
                    f"tuned {tuned.get('params')} for {tuned.get('target')}: {tuned.get('recall')} on held-out "
                    f"passages; build CPU {build_cpu:.1f} s; peak RSS {peak_rss_gib():.2f} GiB]")
        print(f"  {label:>12} {name:<13} build {build:8.2f} s   recall@10 {recall:.3f}   {qps:10,.0f} q/s   "
              f"{mem / 2**20:8.1f} MiB{what}", flush=True)
        if name == "auto":
            auto, auto_cpu = index, build_cpu
    base_build, base_qps, base_mem = rows[0][1], rows[0][3], rows[0][4]
    for name, build, recall, qps, mem in rows[1:]:
        print(f"  {label:>12} {name:<13} vs flat: build x{build / base_build:.1f}, q/s x{qps / base_qps:.1f}, "
              f"memory 1/{base_mem / mem:.1f}, recall {recall:.3f}")
        if name == "auto":
            summary = {"label": label, "recall": recall, "speedup": qps / base_qps, "memory": mem / base_mem,
                       "build": build, "build_cpu": auto_cpu}
    return auto, summary


ENCODE_CHUNK = 2048  # passages per cache file: an interrupted encode loses at most this much work
ENCODE_STEP = 256  # passages per MiniLM call inside a chunk: how often the progress bar moves


def real_vectors(corpus: str, n: int, cache: Path, words: int = WORDS_PER_PASSAGE, threads: int = 0) -> np.ndarray:
    """MiniLM embeddings of `n` random passages of `corpus` (0: all), split into `words`-word passages.

    Encoding is the slow part (tens of passages/s on a CPU core), so it streams: the passages are taken in
    one fixed random order and encoded a chunk at a time into `cache`/minilm_<words>w/chunk_NNNNN.npy
    (written to a temporary name, then renamed). An interrupted encode resumes at the first missing chunk,
    and a run with a smaller `n` reuses the first chunks of a larger one (they are a random sample too).
    Memory while encoding: one chunk of text and vectors; the result is read back from the chunk files.
    """
    store_dir = cache / f"passages_{words}w"
    if not store_dir.is_dir():
        build_passage_store(corpus, store_dir, "train", cache / "corpus_cache", words=words)
    store = PassageStore(store_dir)
    n = len(store) if n <= 0 else n
    if n > len(store):
        raise SystemExit(f"error: --real-n {n} is more than the {len(store):,} passages of {words} words in "
                         f"{corpus}; pass at most {len(store)} (or 0 for all), or fewer --passage-words")
    chunks = cache / f"minilm_{words}w"
    chunks.mkdir(parents=True, exist_ok=True)
    meta = {"corpus": corpus, "words_per_passage": words, "passages": len(store), "chunk": ENCODE_CHUNK, "seed": 0}
    meta_file = chunks / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()) != meta:
        raise SystemExit(f"error: {chunks} holds vectors of another passage set ({meta_file.read_text().strip()}); "
                         f"delete that folder or pass another --cache")
    meta_file.write_text(json.dumps(meta) + "\n")
    order = np.random.default_rng(0).permutation(len(store))
    files = [chunks / f"chunk_{i:05d}.npy" for i in range(-(-n // ENCODE_CHUNK))]
    missing = [i for i, f in enumerate(files) if not f.is_file()]
    if missing:
        _encode_chunks(store, order, files, missing, threads)
    return np.concatenate([np.load(f, mmap_mode="r") for f in files])[:n]


def _encode_chunks(store: PassageStore, order: np.ndarray, files: list[Path], missing: list[int], threads: int) -> None:
    """Encode the chunks `missing` of `order` into `files`, one chunk file at a time."""
    from hybrid_pretrain.retrieval.pretrained import MiniLMEmbedder

    if threads:
        import torch

        torch.set_num_threads(threads)
    embedder = MiniLMEmbedder()
    todo = sum(len(order[i * ENCODE_CHUNK : (i + 1) * ENCODE_CHUNK]) for i in missing)
    total = min(len(files) * ENCODE_CHUNK, len(order))  # whole chunks, so a later, larger n reuses them as they are
    cpu0, t0 = time.process_time(), time.perf_counter()
    with tqdm(total=total, initial=total - todo, desc="MiniLM", unit=" passages") as bar:
        for i in missing:
            rows = order[i * ENCODE_CHUNK : (i + 1) * ENCODE_CHUNK]
            parts = []
            for j in range(0, len(rows), ENCODE_STEP):
                parts.append(embedder.embed(store.texts(rows[j : j + ENCODE_STEP])))
                bar.update(len(parts[-1]))
            tmp = files[i].with_suffix(".tmp.npy")
            np.save(tmp, np.concatenate(parts))
            os.replace(tmp, files[i])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    print(f"  encoded {todo:,} passages: {todo / wall:.1f} passages/s wall, {todo / max(cpu, 1e-9):.1f} per CPU second "
          f"({threads or 'default'} torch threads)", flush=True)


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)) * 1e3, float(np.percentile(samples, 99)) * 1e3


def bench_service(index: ShardedIndex, d: int, reps: int) -> None:
    live = LiveIndex(index=index)
    with IndexServer(live, max_wait_ms=0.0) as server:
        client = IndexClient(server.url)
        q = clustered(256, d, seed=3)
        same = np.array_equal(client.search(q, K)[1], index.search(q, K)[1])
        print(f"  service returns the same ids as in-process search for 256 queries: {same}")
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
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated clustered vector counts (0: none)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--kinds", default="flat,auto",
                   help="flat first; then any of auto,auto-ivf (auto's IVF choice at any size),auto-pq8,auto-ivf-pq8 "
                        "(the same with 8-bit PQ codes instead of 4-bit fast scan),ivfpq,ivfpq+refine,hnsw")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the auto index is tuned for")
    p.add_argument("--corpus", default="", help="data.path spec(s) of passages to embed with MiniLM (real vectors)")
    p.add_argument("--real-n", type=int, default=20000,
                   help="passages embedded from --corpus, queries included (0: all of them)")
    p.add_argument("--passage-words", type=int, default=WORDS_PER_PASSAGE,
                   help="words per passage of --corpus (the store's default; fewer gives more, shorter passages)")
    p.add_argument("--cache", default="", help="folder for the real passages and their embeddings (reused)")
    p.add_argument("--service-reps", type=int, default=200, help="requests per batch size in the latency test")
    p.add_argument("--threads", type=int, default=0,
                   help="FAISS OpenMP threads, and torch threads of the MiniLM encoder (0: their defaults)")
    args = p.parse_args(argv)
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)  # on a shared, loaded machine spinning OpenMP threads thrash
    kinds = args.kinds.split(",")
    if kinds[0] != "flat":
        print("error: --kinds must start with flat (it is the recall ground truth)", file=sys.stderr)
        return 2
    if args.corpus and not args.cache:
        print("error: --corpus needs --cache DIR (embedding is slow; the vectors are kept there)", file=sys.stderr)
        return 2
    summary, service_index = None, None
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
        print(f"indexes on clustered {args.dim}-d vectors, {args.queries} fresh queries, k={K}")
        for n in (int(s) for s in args.sizes.split(",") if int(s)):
            auto, summary = bench_indexes(f"{n:,}", clustered(n, args.dim, seed=0), clustered(args.queries,
                                          args.dim, seed=1), kinds, args.target_recall, Path(tmp))
            service_index = auto or service_index
        if args.corpus:
            x = real_vectors(args.corpus, args.real_n, Path(args.cache), args.passage_words, args.threads)
            held = min(args.queries, len(x) // 10)  # held-out passages: queries, never indexed
            print(f"indexes on MiniLM embeddings of {len(x) - held:,} passages, {held} held-out passages as queries")
            bench_indexes(f"real {len(x) - held:,}", x[held:], x[:held], kinds, args.target_recall, Path(tmp))
        if service_index is not None:
            print(f"index service (HTTP, loopback, binary payload) vs in-process, auto index of "
                  f"{service_index.ntotal:,}")
            bench_service(service_index, args.dim, args.service_reps)
    if summary:
        print(f"auto index at {summary['label']} clustered vectors: recall@10 {summary['recall']:.3f}, "
              f"x{summary['speedup']:.1f} flat's queries/s, memory {summary['memory']:.3f} of flat "
              f"(1/{1 / summary['memory']:.1f}), build {summary['build']:.1f} s ({summary['build_cpu']:.1f} s CPU), "
              f"peak RSS {peak_rss_gib():.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
