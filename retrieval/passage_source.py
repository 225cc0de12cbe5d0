"""Where Atlas's passages come from: an index (in-process or the service) plus the passage store, as token ids.

The model only sees `PassageSource.candidates(query_emb, n)`; which `Retriever` answers (a `LiveIndex` in
this process or an `IndexClient` of the index service) is the trainer's choice. Passage texts are
tokenised once and cached by row, since the same passages come back step after step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from hybrid_pretrain.base.hashing import weights_fingerprint
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.retrieval.encoder import pad_token_lists, tokenize_padded
from hybrid_pretrain.retrieval.passages import PassageStore
from hybrid_pretrain.retrieval.protocol import Retriever
from hybrid_pretrain.retrieval.source_documents import DocumentTable


class PassageSource:
    """Search an index with query embeddings and hand back the hits as padded token ids (Atlas's CandidateSource)."""

    def __init__(self, retriever: Retriever | None, store: PassageStore, tokenizer: Tokenizer,
                 passage_len: int) -> None:
        """`retriever` None: a store read by row only (random passages in evaluation); searching it is an error."""
        self.retriever, self.store, self.tokenizer, self.passage_len = retriever, store, tokenizer, passage_len
        self._tokens: dict[int, list[int]] = {}
        self._documents: DocumentTable | None = None  # built by build_document_table
        self._row_docs = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.store)

    def __str__(self) -> str:
        return f"passage store {self.store.path}"

    def tokens_of_rows(self, rows: Sequence[int]) -> list[list[int]]:
        missing = sorted({int(r) for r in rows if int(r) not in self._tokens})
        if missing:
            for r, ids in zip(missing, self.tokenizer.encode_batch(self.store.texts(missing))):
                self._tokens[r] = ids[: self.passage_len] or [self.tokenizer.eos_id]
        return [self._tokens[int(r)] for r in rows]

    def build_document_table(self) -> float:
        """Hash every passage's spans into the table `same_document` looks windows up in; returns the seconds it
        took. Called where the source is set up (``exclude_source: document``), not inside the first training step:
        it tokenises the whole store (seconds for PG-19's 25k passages)."""
        t0 = time.perf_counter()
        rows = range(len(self.store))
        keys: dict[tuple[str, int], int] = {}
        docs = np.array([keys.setdefault((p.source, p.doc), len(keys)) for p in map(self.store.__getitem__, rows)])
        self._row_docs = docs
        self._documents = DocumentTable(self.tokenizer.encode_batch(self.store.texts(rows)), docs)
        return time.perf_counter() - t0

    def same_document(self, windows: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """windows (B, L) token ids, ids (B, C) passage ids -> (B, C) bool: passage c comes from a document whose
        text window b holds (Atlas's document-level filter; needs `build_document_table` first)."""
        if self._documents is None:
            raise RuntimeError(f"{self} has no document table: call build_document_table() when setting it up for "
                               "model.options.atlas.exclude_source=document (retrieval.for_training does)")
        cand_docs = self._row_docs[self.store.rows_of(ids.reshape(-1))].reshape(ids.shape)  # (B, C)
        out = np.zeros(ids.shape, bool)
        for b, window in enumerate(windows.tolist()):
            mine = self._documents.documents_of_window(window)
            out[b] = [d in mine for d in cand_docs[b]]
        return torch.from_numpy(out)

    def candidates(self, query_emb: torch.Tensor, n: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """query_emb (B, D) -> (passage ids (B, n), token ids (B, n, P), mask (B, n, P)) of the top-n hits."""
        if self.retriever is None:
            raise RuntimeError(f"{self} was opened without an index (rows only); open it with search to retrieve")
        _, ids = self.retriever.search(query_emb.detach().float().cpu().numpy(), n)  # (B, n)
        if (ids < 0).any():
            raise ValueError(f"the index returned fewer than {n} passages per query; it holds too few passages "
                             f"(passage store {self.store.path} has {len(self.store)})")
        rows = self.store.rows_of(ids.reshape(-1))
        toks = self.tokens_of_rows(rows.tolist())
        out, mask = pad_token_lists(toks, self.tokenizer.pad_id, self.passage_len)  # (B * n, P)
        B, P = ids.shape[0], self.passage_len
        return ids, out.view(B, n, P), mask.view(B, n, P)


class PassageEmbedder:
    """The `Embedder` an index is (re)built with: the Atlas model's current passage tower, without gradients."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, passage_len: int, batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.passage_len, self.batch_size = model, tokenizer, passage_len, batch_size
        self.dim = model.passage_tower.cfg.d_model
        self.fingerprint = weights_fingerprint(model.passage_tower)  # hashed once while query-side-only

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        tower = self.model.passage_tower
        was = tower.training
        tower.eval()
        device = next(tower.parameters()).device
        out = []
        try:
            for i in range(0, len(texts), self.batch_size):
                ids, mask = tokenize_padded(self.tokenizer, texts[i : i + self.batch_size], self.passage_len)
                out.append(tower(ids.to(device), mask.to(device)).float().cpu().numpy())
        finally:
            tower.train(was)
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
