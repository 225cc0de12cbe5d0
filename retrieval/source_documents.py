"""Which stored documents a token window was cut from, found by its text: for Atlas's document-level filter.

A training window is a span of the packed token stream and carries no document id, but its text is in the
passage store (the store is the training split). A table of hashed ``NGRAM``-token spans of every passage
(one every ``STRIDE`` tokens, hashed by `base.hashing.token_span_hashes` as Atlas's source filter hashes them)
maps any window that overlaps a passage by ``NGRAM + STRIDE - 1`` tokens or more to that passage's document.
Hand-written because FAISS indexes vectors, not token spans; numpy keeps the table at 16 bytes per entry
(~13 MB for the 25k passages of PG-19's sample).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hybrid_pretrain.base.hashing import token_span_hashes

NGRAM, STRIDE = 10, 4


class DocumentTable:
    """`documents_of_window(ids)` -> the set of store documents whose text the window holds."""

    def __init__(self, passage_tokens: Sequence[Sequence[int]], passage_docs: np.ndarray) -> None:
        """passage_tokens: every passage's full token ids, by row; passage_docs (rows,): a document key per row."""
        hashes, rows = [], []
        for row, ids in enumerate(passage_tokens):
            h = token_span_hashes(ids, NGRAM, STRIDE)
            hashes.append(h)
            rows.append(np.full(len(h), row, np.int64))
        h, r = np.concatenate(hashes), np.concatenate(rows)
        order = np.argsort(h, kind="stable")
        self.hashes, self.rows, self.docs = h[order], r[order], np.asarray(passage_docs)

    def documents_of_window(self, ids: Sequence[int]) -> set[int]:
        h = token_span_hashes(ids, NGRAM)
        pos = np.clip(np.searchsorted(self.hashes, h), 0, max(len(self.hashes) - 1, 0))
        hit = self.hashes[pos] == h if len(self.hashes) else np.zeros(len(h), bool)
        return {int(d) for d in self.docs[self.rows[pos[hit]]]}
