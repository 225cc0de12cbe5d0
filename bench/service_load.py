"""Index service under load while its index is rebuilt and swapped every second (issue 19 item 3).

    python bench/service_load.py                                  # 8 clients x 10,000 requests, batch 1-32
    python bench/service_load.py --clients 2 --requests 200       # a quick look

Two phases over the same request mix (each request: a batch of 1-32 query vectors, k=10):
  service     the real service in its own process (``python -m hybrid_pretrain.retrieval.service``, token
              from the environment), `--clients` threads each with its own keep-alive IndexClient;
  in-process  the same threads calling ``LiveIndex.search`` directly, as a trainer without the service does.
In both, a builder process publishes a new index version (new vectors, as a refreshed encoder gives)
every `--rebuild-every` seconds; the service is told to reload after each, the in-process index
polls for it. Prints requests/s, queries/s, p50/p99 latency over all requests and at batch 32, failed
queries (errors, or answers of the wrong shape or with missing ids) and the service / in-process ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

import faiss
import numpy as np

from hybrid_pretrain.retrieval.auth import TOKEN_ENV
from hybrid_pretrain.retrieval.build import build_from_vectors
from hybrid_pretrain.retrieval.client import IndexClient
from hybrid_pretrain.retrieval.index import IndexSpec
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.service_process import ServiceProcess

K = 10
TOKEN = "bench-token"


def clustered(n: int, d: int, seed: int, clusters: int = 256) -> np.ndarray:
    """Unit-normalised Gaussian-mixture vectors; the centres are fixed, so every version answers alike."""
    centers = np.random.default_rng(12345).normal(size=(clusters, d))
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rebuild_loop(index_dir: str, n: int, d: int, every: float, url: str, stop, ready, published) -> None:  # noqa: ANN001
    """Builder process: publish a new version now and every `every` s, then tell the service (if `url`) to
    reload; `ready` is set after the first, so clients start only once the rebuilds are running."""
    ids = np.arange(n, dtype=np.int64)
    client = IndexClient(url, token=TOKEN) if url else None
    seed = 100
    while True:
        seed += 1
        build_from_vectors(index_dir, IndexSpec("flat"), clustered(n, d, seed), ids)
        if client is not None:
            client.reload()
        published.value += 1
        ready.set()
        if stop.wait(every):
            return


class Phase:
    """Latencies and failures of one phase, filled by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: list[tuple[int, float]] = []  # (batch, seconds)
        self.failed_queries = 0
        self.errors: list[str] = []
        self.versions: set[int] = set()
        self.seconds = 0.0


def run_clients(search, phase: Phase, clients: int, requests: int, queries: np.ndarray,  # noqa: ANN001
                version_of) -> None:  # noqa: ANN001
    """`clients` threads, each sending `requests` batches of 1-32 rows drawn from `queries`."""

    def worker(w: int) -> None:
        rng = np.random.default_rng(w)
        state = threading.local()
        mine: list[tuple[int, float]] = []
        failed, errors, seen = 0, [], set()
        for _ in range(requests):
            b = int(rng.integers(1, 33))
            start = int(rng.integers(0, len(queries) - b))
            q = queries[start : start + b]
            t0 = time.perf_counter()
            try:
                _, ids = search(q, state)
                ok = ids.shape == (b, K) and bool((ids >= 0).all())
            except Exception as e:  # noqa: BLE001 - every failure is counted, never fatal to the benchmark
                ok = False
                errors.append(f"{type(e).__name__}: {e}")
            mine.append((b, time.perf_counter() - t0))
            failed += 0 if ok else b
            seen.add(version_of(state))
        with phase.lock:
            phase.latency += mine
            phase.failed_queries += failed
            phase.errors += errors[:5]
            phase.versions |= seen

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.seconds = time.perf_counter() - t0


def start_service(index_dir: str, args: argparse.Namespace) -> ServiceProcess:
    """The service in its own process, token from the environment (enter it to start)."""
    env = dict(os.environ, **{TOKEN_ENV: TOKEN}, OMP_NUM_THREADS=str(args.service_threads))
    return ServiceProcess(index_dir, env=env, extra_args=["--max-wait-ms", str(args.max_wait_ms),
                                                           "--search-threads", str(args.search_threads)])


@contextmanager
def rebuilding(index_dir: str, args: argparse.Namespace, url: str) -> Iterator[multiprocessing.Value]:
    """A builder process publishing a version every `args.rebuild_every` s while the block runs."""
    ctx = multiprocessing.get_context("spawn")
    stop, ready, published = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    builder = ctx.Process(target=rebuild_loop, args=(index_dir, args.n, args.dim, args.rebuild_every, url, stop,
                                                     ready, published))
    builder.start()
    try:
        if not ready.wait(600):
            raise RuntimeError("the builder process published nothing within 10 minutes")
        published.value = 0  # count the versions published while the clients run
        yield published
    finally:
        stop.set()
        builder.join(timeout=60)


def service_phase(index_dir: str, args: argparse.Namespace, queries: np.ndarray) -> tuple[Phase, int]:
    phase = Phase()

    with start_service(index_dir, args) as service:

        def search(q: np.ndarray, state: threading.local) -> tuple[np.ndarray, np.ndarray]:
            state.client = getattr(state, "client", None) or IndexClient(service.url, token=TOKEN)
            return state.client.search(q, K)

        with rebuilding(index_dir, args, service.url) as published:
            run_clients(search, phase, args.clients, args.requests, queries, lambda state: state.client.last_version)
    return phase, published.value


def in_process_phase(index_dir: str, args: argparse.Namespace, queries: np.ndarray) -> tuple[Phase, int]:
    live, phase, done = LiveIndex(index_dir, use_gpu=False), Phase(), threading.Event()

    def poll() -> None:
        while not done.wait(0.1):
            live.reload()

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with rebuilding(index_dir, args, "") as published:
            run_clients(lambda q, state: live.search(q, K), phase, args.clients, args.requests, queries,
                        lambda state: live.version)
    finally:
        done.set()
        poller.join()
    return phase, published.value


def summary(name: str, phase: Phase) -> dict:
    lat = np.array([s for _, s in phase.latency]) * 1e3
    at32 = np.array([s for b, s in phase.latency if b == 32]) * 1e3
    queries = sum(b for b, _ in phase.latency)
    row = {"phase": name, "requests": len(lat), "queries": queries, "seconds": phase.seconds,
           "rps": len(lat) / phase.seconds, "qps": queries / phase.seconds,
           "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
           "p50_32": float(np.percentile(at32, 50)) if len(at32) else float("nan"),
           "p99_32": float(np.percentile(at32, 99)) if len(at32) else float("nan"),
           "failed": phase.failed_queries, "versions": len(phase.versions - {None})}
    print(f"{name:<11} {row['requests']:>7,} req {queries:>9,} queries in {phase.seconds:6.1f} s  "
          f"{row['rps']:8.1f} req/s {row['qps']:9.1f} q/s  p50/p99 {row['p50']:7.2f}/{row['p99']:7.2f} ms  "
          f"batch 32 p50/p99 {row['p50_32']:7.2f}/{row['p99_32']:7.2f} ms  failed queries {phase.failed_queries}  "
          f"versions seen {row['versions']}", flush=True)
    for e in phase.errors[:5]:
        print(f"  error: {e}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=10_000, help="requests per client (each of 1-32 queries)")
    p.add_argument("--n", type=int, default=10_000, help="indexed vectors")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rebuild-every", type=float, default=1.0, help="seconds between published versions")
    p.add_argument("--threads", type=int, default=1,
                   help="FAISS OpenMP threads per search in process (the clients' threads already run in parallel)")
    p.add_argument("--service-threads", type=int, default=os.cpu_count() or 1,
                   help="FAISS OpenMP threads of the service's one search thread (default: all CPUs)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="the service's --max-wait-ms (batch gathering)")
    p.add_argument("--search-threads", type=int, default=0, help="the service's --search-threads (0: its default)")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    queries = clustered(4096, args.dim, seed=7)
    print(f"{args.clients} clients x {args.requests} requests (batch 1-32, k={K}); flat index of {args.n} x "
          f"{args.dim}, rebuilt every {args.rebuild_every:g} s; FAISS threads {args.threads} in process, "
          f"{args.service_threads} in the service over {args.search_threads or 'default'} search threads (max wait "
          f"{args.max_wait_ms:g} ms); {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with TemporaryDirectory(prefix="service-load-") as tmp:
        index_dir = str(Path(tmp) / "index")
        build_from_vectors(index_dir, IndexSpec("flat"), clustered(args.n, args.dim, 100),
                           np.arange(args.n, dtype=np.int64))
        for name, run in (("service", service_phase), ("in-process", in_process_phase)):
            phase, published = run(index_dir, args, queries)
            rows.append(summary(name, phase))
            print(f"{'':<11} builder published {published} versions during the phase", flush=True)
    svc, local = rows
    print(f"service / in-process: p50 x{svc['p50'] / local['p50']:.2f}, p99 x{svc['p99'] / local['p99']:.2f}, "
          f"batch 32 p50 x{svc['p50_32'] / local['p50_32']:.2f} (goal <= 1.3), "
          f"p99 x{svc['p99_32'] / local['p99_32']:.2f}; "
          f"queries/s x{svc['qps'] / local['qps']:.2f}; failed queries {svc['failed']} (goal 0)")
    return 0 if svc["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
