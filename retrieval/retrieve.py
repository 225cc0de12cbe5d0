"""What a retrieval-augmented model calls: query texts or embeddings in, scored passages out.

The Atlas model (issue 7, item 4) holds a `PassageRetriever`; whether its `Retriever` is an
in-process `LiveIndex` or an `IndexClient` of the service is a deployment choice, not a model one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hybrid_pretrain.retrieval.passages import PassageStore
from hybrid_pretrain.retrieval.protocol import Retriever
from hybrid_pretrain.retrieval.refresh import over_retrieve_rerank


@dataclass
class Retrieved:
    scores: torch.Tensor  # (n, k): differentiable w.r.t. the query encoder when re-ranked, else detached
    ids: np.ndarray  # (n, k) int64 passage ids, -1 where fewer than k exist
    texts: list[list[str]]  # n lists of k passage texts ("" for -1)


class PassageRetriever:
    """Top-k passages for query embeddings, optionally over-retrieved and re-ranked by the current encoder."""

    def __init__(self, retriever: Retriever, store: PassageStore, rerank_factor: int = 1,
                 embed_passages: Callable[[Sequence[str]], torch.Tensor] | None = None) -> None:
        if rerank_factor > 1 and embed_passages is None:
            raise ValueError("rerank_factor > 1 needs embed_passages (the current passage encoder)")
        self.retriever, self.store = retriever, store
        self.rerank_factor, self.embed_passages = rerank_factor, embed_passages

    def retrieve(self, query_emb: torch.Tensor, k: int) -> Retrieved:
        """query_emb (n, D) -> k passages per query."""
        if self.rerank_factor > 1:
            scores, ids = over_retrieve_rerank(query_emb, self.retriever, self.store, self.embed_passages, k,
                                               self.rerank_factor)
        else:
            s, ids = self.retriever.search(query_emb.detach().float().cpu().numpy(), k)
            scores = torch.from_numpy(np.ascontiguousarray(s))
        rows = self.store.rows_of(ids.reshape(-1)).reshape(ids.shape)
        texts = [[self.store.text(int(r)) if r >= 0 else "" for r in row] for row in rows]
        return Retrieved(scores, ids, texts)
