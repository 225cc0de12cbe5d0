"""The two interfaces the rest of the system codes against: a vector `Retriever` and a text `Embedder`.

An in-process index (`retrieval.index.ShardedIndex`) and the network client
(`retrieval.client.IndexClient`) both satisfy `Retriever`, so the trainer (and later the Atlas model)
takes either: one machine searches in-process, a cluster queries the index service.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: float32 (n, d) -> (scores float32 (n, k), passage ids int64 (n, k)); id -1 pads short lists."""
        ...


@runtime_checkable
class Embedder(Protocol):
    dim: int
    fingerprint: str  # sha256 of the weights, recorded in index manifests

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Passages -> float32 (n, dim)."""
        ...
