"""Generated data for the retrieval tests: clustered vectors (ANN recall is meaningless on i.i.d. noise)."""

from __future__ import annotations

import numpy as np


def clustered(n: int, d: int = 32, clusters: int = 64, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """float32 (n, d) Gaussian-mixture vectors, unit-normalised like sentence embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def ids_for(n: int, seed: int = 1) -> np.ndarray:
    """Sparse, shuffled int64 ids (as passage hashes are), so row/id mix-ups show."""
    return np.random.default_rng(seed).choice(1 << 40, n, replace=False).astype(np.int64)


def exact_topk(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, top, 1), ids[top]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))
