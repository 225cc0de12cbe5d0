"""Request batcher: concurrent searches are merged into one FAISS call, which is how an index serves many
trainer ranks at once (one search over 256 queries costs far less than 256 searches of one).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import faiss
import numpy as np

from hybrid_pretrain.retrieval.live import LiveIndex


class SearchBatcher:
    """`submit(queries (n, d), k) -> (scores (n, k), ids (n, k), version)`, run on background search threads.

    A batch starts with the first waiting request and takes more until `max_batch` rows or `max_wait_ms`.
    The batch is searched at its largest k and each request keeps its first k columns; for exact
    (flat) search that equals a search at k, for ANN indexes it can only be as good or better.
    `search_threads` batches run at once (CPU FAISS searches are thread-safe; GPU ones share one stream,
    so keep 1 there); the caller's OpenMP threads are split among them, since OpenMP workers that wait
    by spinning waste a loaded machine's cores, while requests that arrive during a search start the
    next batch on an idle thread instead of queueing behind it.
    """

    def __init__(self, live: LiveIndex, max_batch: int = 256, max_wait_ms: float = 2.0,
                 search_threads: int = 1) -> None:
        if search_threads < 1:
            raise ValueError(f"search_threads must be a positive integer, got {search_threads}")
        self.live, self.max_batch, self.max_wait = live, max_batch, max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.stats = {"requests": 0, "queries": 0, "batches": 0, "errors": 0}
        self._stats_lock = threading.Lock()
        # OpenMP settings are per thread: carry the caller's over, shared among the search threads
        self._omp_threads = max(1, faiss.omp_get_max_threads() // search_threads)
        self._threads = [threading.Thread(target=self._loop, name=f"search-batcher-{i}", daemon=True)
                         for i in range(search_threads)]
        for t in self._threads:
            t.start()

    def submit(self, queries: np.ndarray, k: int, timeout: float | None = 60.0) -> tuple[np.ndarray, np.ndarray, int]:
        fut: Future = Future()
        self._queue.put((np.ascontiguousarray(queries, dtype=np.float32), k, fut))
        return fut.result(timeout)

    def _take_batch(self) -> list:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, rows = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            rows += len(item[0])
        return batch

    def _loop(self) -> None:
        faiss.omp_set_num_threads(self._omp_threads)
        while not self._stop.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            index, manifest = self.live.snapshot()  # one version for the whole batch
            try:
                kmax = max(k for _, k, _ in batch)
                scores, ids = index.search(np.concatenate([q for q, _, _ in batch]), kmax)
            except Exception as e:  # noqa: BLE001 - handed to every waiting caller, never kills the loop
                with self._stats_lock:
                    self.stats["errors"] += len(batch)
                for _, _, fut in batch:
                    fut.set_exception(e)
                continue
            start = 0
            for q, k, fut in batch:
                fut.set_result((scores[start : start + len(q), :k], ids[start : start + len(q), :k],
                                int(manifest["version"])))
                start += len(q)
            with self._stats_lock:
                self.stats["requests"] += len(batch)
                self.stats["queries"] += start
                self.stats["batches"] += 1

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
