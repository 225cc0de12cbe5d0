"""Exact re-ranking from full vectors kept on disk: only the candidates' rows are read (np.memmap).

Why not FAISS's `IndexRefineFlat`: it holds every full vector in RAM (512 MB for 1M x 128 fp32), eight
times the budget of the index it refines. Why re-rank at all: measured on 1M clustered 128-d vectors
(bench/retrieval.py's data, 1,000 queries, k=10, IVF4096 with an HNSW coarse quantizer), 32-byte codes
alone stay far below recall@10 0.95 at any nprobe (PQ32x8: 0.35; the 4-bit FastScan PQ64x4fs: 0.15),
and ranking their top 100 / 200 exactly gives 0.93 / 0.985 with PQ32x8 (0.58 / 0.76 with PQ64x4fs).
Codes big enough to need no re-ranking (SQ4: 64 bytes + 8-byte ids) would pass 1/8 of flat. So a
re-ranking shard stores row numbers in FAISS and keeps, beside its .faiss file, `<shard>.vectors.npy`
(float32, row order) and `<shard>.ids.npy` (passage ids, row order); both are memory-mapped, so RAM
holds the PQ index (41 MiB at 1M x 128) and whatever pages the OS chooses to cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hybrid_pretrain.base.hashing import file_sha256


class FullVectors:
    """One shard's full vectors and passage ids by row; arrays or read-only memory maps."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        self.vectors, self.ids = vectors, ids

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, folder: Path, stem: str) -> dict:
        """Write `<stem>.vectors.npy` and `<stem>.ids.npy` into `folder` (skipped when already there, e.g. a
        build that embedded straight into the file); returns their manifest entries."""
        entry = {}
        for key, array in (("vectors", self.vectors), ("ids", self.ids)):
            path = Path(folder) / f"{stem}.{key}.npy"
            if Path(getattr(array, "filename", "") or "").resolve() != path.resolve():
                np.save(path, np.ascontiguousarray(array))
            entry[key] = {"file": path.name, "sha256": file_sha256(path)}
        return entry

    @classmethod
    def open(cls, folder: Path, entry: dict) -> FullVectors:
        """Memory-map a shard's files named in its manifest `entry` (what `save` returned)."""
        return cls(np.load(Path(folder) / entry["vectors"]["file"], mmap_mode="r"),
                   np.load(Path(folder) / entry["ids"]["file"], mmap_mode="r"))

    def rerank(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of `queries` (n, d) with candidate `rows` (n, m; -1 = none) -> top-k (scores, ids)."""
        valid = rows >= 0
        safe = np.where(valid, rows, 0)
        # one fancy index in the candidates' order: reading rows sorted (or de-duplicated) measured no faster at
        # 1M (28 vs 30 ms for 160k rows), and putting them back in order cost more than it saved
        picked = self.vectors[safe.ravel()].reshape(*rows.shape, -1)  # reads only these rows
        scores = np.matmul(picked, queries[:, :, None], dtype=np.float32)[..., 0]
        scores[~valid] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.indices(scores.shape)[1]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
        best = np.take_along_axis(scores, top, 1)
        ids = np.where(np.isfinite(best), self.ids[np.take_along_axis(safe, top, 1)], -1)
        return best, ids
