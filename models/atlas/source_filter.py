"""Atlas's LM-pretraining filter: a window never retrieves the passage it was cut from (or, stricter, its document).

Atlas (Izacard et al. 2022; its LM task's ``filter``) drops the passage being generated from the retrieved
results. Kept, the reader learns to find the exact continuation in a passage and copy it, which no held-out
text offers: on it the same reader copies from whatever lexically similar passage was retrieved, and retrieved
passages score worse than random ones (bench/RESULTS.md, issue 22). A training window here is a span of the
token stream, not a stored passage, so the filter matches text instead of ids: a passage that shares a span of
``SOURCE_NGRAM`` tokens with the window holds the window's text (its source passage, either neighbour it
straddles, or a duplicate edition of the book elsewhere in the store).
"""

from __future__ import annotations

import torch

EXCLUDE = ("none", "passage", "document")  # model.options.atlas.exclude_source
OVERFETCH = {"passage": 2, "document": 8}  # candidates fetched per kept passage: a book fills a top 8 with itself
SOURCE_NGRAM = 10  # tokens (~7 words): longer than the phrases books share, shorter than a passage overlap


def _ngrams(ids: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


def holds_window_text(windows: torch.Tensor, passages: torch.Tensor, mask: torch.Tensor,
                      n: int = SOURCE_NGRAM) -> torch.Tensor:
    """windows (B, L), passages (B, C, P) with mask (B, C, P) -> (B, C) bool: passage c shares an n-gram with
    window b."""
    B, C, _ = passages.shape
    out = torch.zeros(B, C, dtype=torch.bool)
    for b in range(B):
        window = _ngrams(windows[b].tolist(), n)
        for c in range(C):
            ids = passages[b, c][mask[b, c]].tolist()
            out[b, c] = any(g in window for g in _ngrams(ids, n))
    return out


def without_source(holds: torch.Tensor, k: int) -> torch.Tensor:
    """holds (B, C) from `holds_window_text`, candidates best first -> (B, k) indices of the k best candidates
    that do not hold the window's text (those that do only fill in, last, when fewer than k others exist)."""
    C = holds.shape[1]
    rank = torch.arange(C)[None, :] + holds.long() * C  # (B, C): holding candidates sort after all others
    return rank.argsort(dim=1)[:, :k]
