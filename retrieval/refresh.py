"""Atlas's three answers to a stale index (Izacard et al. 2022, section 2.4), as calls a trainer makes.

1. Re-index on a schedule: `IndexRefresher.maybe_refresh(step, embedder)` every `refresh_every` steps,
   a full rebuild (sharded over ranks) or a rolling incremental one (re-embed the stalest fraction),
   after which the serving index (a LiveIndex, or the service through its client) swaps atomically;
   skipped while every passage is already embedded by the current encoder (a frozen passage tower).
2. Over-retrieve and re-rank: `over_retrieve_rerank` takes k * factor candidates from the stale index
   and re-scores them with the current passage encoder.
3. Query-side-only training: `DualEncoder.freeze_passages()` (retrieval.encoder) freezes the passage
   tower, so the index never goes stale; `query_side_only(encoder)` below is the same as a call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid_pretrain.retrieval.build import build_full, refresh_incremental, stale_ids, store_info
from hybrid_pretrain.retrieval.config import MODES
from hybrid_pretrain.retrieval.encoder import DualEncoder
from hybrid_pretrain.retrieval.index import IndexSpec, current_version, read_manifest
from hybrid_pretrain.retrieval.passages import PassageStore
from hybrid_pretrain.retrieval.protocol import Embedder, Retriever


@dataclass
class RefreshConfig:
    refresh_every: int = 0  # steps between refreshes; 0: never (query-side-only or re-ranking instead)
    mode: str = "full"  # full: re-embed everything; rolling: re-embed `rolling_fraction` per refresh
    rolling_fraction: float = 0.25

    def validate(self) -> None:
        if self.refresh_every < 0:
            raise ValueError(f"retrieval.refresh_every must be >= 0, got {self.refresh_every}")
        if self.mode not in MODES:
            raise ValueError(f"retrieval.refresh_mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if not 0.0 < self.rolling_fraction <= 1.0:
            raise ValueError(f"retrieval.rolling_fraction must be in (0, 1], got {self.rolling_fraction}")


class IndexRefresher:
    """Rebuilds the index in `index_dir` on schedule and tells the serving side (`on_publish(version)`).

    `on_publish` is `LiveIndex.reload` in-process or `IndexClient.reload` with a service. Every rank
    calls `maybe_refresh` (a full rebuild is sharded across them); rolling refreshes run on rank 0.
    """

    def __init__(self, cfg: RefreshConfig, index_dir: str | Path, store: PassageStore, spec: IndexSpec,
                 on_publish: Callable[[int], object] | None = None, rank: int = 0, world_size: int = 1) -> None:
        cfg.validate()
        self.cfg, self.index_dir, self.store, self.spec = cfg, Path(index_dir), store, spec
        self.on_publish, self.rank, self.world_size = on_publish, rank, world_size

    def due(self, step: int) -> bool:
        return self.cfg.refresh_every > 0 and step > 0 and step % self.cfg.refresh_every == 0

    def up_to_date(self, embedder: Embedder) -> bool:
        """Every passage of the store is indexed by `embedder` already (e.g. a frozen passage tower)."""
        if current_version(self.index_dir) is None:
            return False
        manifest = read_manifest(self.index_dir)
        return (manifest.get("encoder_counts") == {embedder.fingerprint: len(self.store)}
                and manifest.get("passage_store") == store_info(self.store))

    def maybe_refresh(self, step: int, embedder: Embedder, progress: bool = False) -> dict | None:
        """Refresh when `step` is due and the index is stale; returns the new manifest (None when not due, up
        to date, or on a non-zero rank). Every rank reads the same manifest, so all skip or none does."""
        if not self.due(step) or self.up_to_date(embedder):
            return None
        if self.cfg.mode == "full":
            manifest = build_full(self.store, embedder, self.index_dir, self.spec, self.rank, self.world_size,
                                  progress=progress)
        elif self.rank == 0:
            limit = max(1, int(round(self.cfg.rolling_fraction * len(self.store))))
            stale = stale_ids(self.index_dir, embedder.fingerprint, limit)
            manifest = refresh_incremental(self.index_dir, self.store, embedder, stale, progress=progress)
        else:
            return None
        if self.rank == 0 and self.on_publish is not None:
            self.on_publish(manifest["version"])
        return manifest if self.rank == 0 else None


def over_retrieve_rerank(
    query_emb: torch.Tensor,
    retriever: Retriever,
    store: PassageStore,
    embed_passages: Callable[[Sequence[str]], torch.Tensor],
    k: int,
    factor: int = 4,
) -> tuple[torch.Tensor, np.ndarray]:
    """Top-k by the current encoder among the stale index's top k * factor.

    query_emb (n, D) from the current query encoder (gradients flow through the returned scores);
    `embed_passages(texts) -> (m, D)` is the current passage encoder. Returns (scores (n, k), ids (n, k)),
    ids -1 and score -inf where the index held fewer than k passages.
    """
    n = query_emb.shape[0]
    _, cand = retriever.search(query_emb.detach().float().cpu().numpy(), k * factor)  # (n, k*factor)
    rows = store.rows_of(cand.reshape(-1)).reshape(cand.shape)
    valid = rows >= 0
    flat_rows = rows[valid]
    p = embed_passages(store.texts(flat_rows)) if len(flat_rows) else query_emb.new_zeros((0, query_emb.shape[1]))
    full = query_emb.new_zeros((n, cand.shape[1], query_emb.shape[1]))  # (n, k*factor, D)
    full[torch.from_numpy(valid)] = p.to(full.dtype)
    scores = torch.einsum("nd,nmd->nm", query_emb, full)  # (n, k*factor)
    scores = scores.masked_fill(~torch.from_numpy(valid).to(scores.device), float("-inf"))
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    ids = np.take_along_axis(cand, top.indices.cpu().numpy(), axis=1)
    ids = np.where(np.isfinite(top.values.detach().cpu().numpy()), ids, -1)
    return top.values, ids


def query_side_only(encoder: DualEncoder) -> DualEncoder:
    """Freeze the passage tower (no gradient, no updates): the index built from it stays valid all run."""
    encoder.freeze_passages()
    return encoder
