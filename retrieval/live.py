"""An index that can be replaced while it serves: searches run on a snapshot, a reload swaps the reference.

The swap is one attribute assignment of an (index, manifest) tuple, atomic under the GIL, so every
search sees either the old version or the new one whole, and none fails during a refresh. A new
version that fails to load (a corrupt shard, a bad manifest) never replaces the serving one: the
reload raises, the version is remembered as rejected and not tried again.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from hybrid_pretrain.retrieval.errors import RetrievalIndexError
from hybrid_pretrain.retrieval.index import ShardedIndex, current_version, load_index


class LiveIndex:
    """A `Retriever` over the published version of `index_dir` (or a given index), swappable at any time."""

    def __init__(self, index_dir: str | Path | None = None, index: ShardedIndex | None = None,
                 manifest: dict | None = None, use_gpu: bool = True) -> None:
        if (index_dir is None) == (index is None):
            raise ValueError("LiveIndex needs exactly one of index_dir or index")
        self.index_dir, self.use_gpu = (Path(index_dir) if index_dir else None), use_gpu
        self._reload_lock = threading.Lock()
        self.rejected: dict[int, str] = {}  # version -> why it failed to load
        if index is not None:
            self._current = (index, manifest or {"version": 0})
        else:
            self._current = load_index(self.index_dir, use_gpu=use_gpu)

    def snapshot(self) -> tuple[ShardedIndex, dict]:
        return self._current

    @property
    def version(self) -> int:
        return int(self._current[1]["version"])

    @property
    def d(self) -> int:
        return self._current[0].d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index, _ = self._current
        return index.search(queries, k)

    def swap(self, index: ShardedIndex, manifest: dict) -> None:
        if index.d != self.d:
            raise ValueError(f"cannot swap in an index of dimension {index.d} for one of {self.d}")
        self._current = (index, manifest)

    def reload(self) -> int:
        """Load the published version if it is newer than the one serving (searches go on meanwhile).

        Raises RetrievalIndexError, naming the version and why, when it cannot be loaded; the old index
        keeps serving and that version is not tried again.
        """
        if self.index_dir is None:
            return self.version
        with self._reload_lock:  # two reloads at once would load the same version twice
            try:
                latest = current_version(self.index_dir)
            except (OSError, ValueError) as e:
                raise RetrievalIndexError(f"{self.index_dir}/CURRENT is unreadable ({e}); still serving version "
                                          f"{self.version}") from None
            if latest is None or latest <= self.version:
                return self.version
            if latest in self.rejected:
                raise RetrievalIndexError(self.rejected[latest])
            try:
                self.swap(*load_index(self.index_dir, latest, use_gpu=self.use_gpu))
            except Exception as e:  # noqa: BLE001 - whatever a bad version raises (FAISS, JSON, I/O), keep serving
                detail = (str(e).splitlines() or [""])[0][:300]
                self.rejected[latest] = (f"index version {latest} in {self.index_dir} failed to load "
                                         f"({type(e).__name__}: {detail}); still serving version {self.version}")
                raise RetrievalIndexError(self.rejected[latest]) from None
        return self.version
