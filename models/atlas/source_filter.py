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

import numpy as np
import torch

from hybrid_pretrain.base.hashing import token_span_hashes

EXCLUDE = ("none", "passage", "document")  # model.options.atlas.exclude_source
OVERFETCH = {"passage": 2, "document": 8}  # candidates fetched per kept passage: a book fills a top 8 with itself
SOURCE_NGRAM = 10  # tokens (~7 words): longer than the phrases books share, shorter than a passage overlap


def holds_window_text(windows: torch.Tensor, passages: torch.Tensor, mask: torch.Tensor,
                      n: int = SOURCE_NGRAM) -> torch.Tensor:
    """windows (B, L), passages (B, C, P) with mask (B, C, P) -> (B, C) bool: passage c shares an n-gram with
    window b. A passage's n-grams are those of its kept tokens (mask True) read in order; every span is hashed
    (`base.hashing.token_span_hashes`, as the passage store's document table) and looked up in the window's sorted
    hashes, all rows at once (a training step filters B x C candidates)."""
    B, C, P = passages.shape
    keep = mask.cpu().numpy()
    order = np.argsort(~keep, axis=-1, kind="stable")  # (B, C, P): kept tokens first, in their order
    kept = np.take_along_axis(passages.cpu().numpy(), order, axis=-1)
    spans = token_span_hashes(kept, n).view(np.int64)  # (B, C, S); int64 keeps the bits, torch sorts it
    if spans.shape[-1] == 0 or windows.shape[1] < n:
        return torch.zeros(B, C, dtype=torch.bool)
    real = np.arange(spans.shape[-1]) < (keep.sum(-1) - n + 1)[..., None]  # (B, C, S): spans of kept tokens only
    window = torch.from_numpy(token_span_hashes(windows.cpu().numpy(), n).view(np.int64)).sort(dim=1).values  # (B, W)
    query = torch.from_numpy(spans).reshape(B, C * spans.shape[-1])  # (B, C * S)
    at = torch.searchsorted(window, query).clamp_max(window.shape[1] - 1)
    found = (window.gather(1, at) == query).view(B, C, -1)  # (B, C, S)
    return (found & torch.from_numpy(real)).any(dim=-1)


def holds_window_text_reference(windows: torch.Tensor, passages: torch.Tensor, mask: torch.Tensor,
                                n: int = SOURCE_NGRAM) -> torch.Tensor:
    """`holds_window_text` in its first, set-based form (one Python set of n-gram tuples per window and per passage):
    the reference the vectorised filter is tested and benchmarked against."""
    def ngrams(ids: list[int]) -> set[tuple[int, ...]]:
        return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}

    B, C, _ = passages.shape
    out = torch.zeros(B, C, dtype=torch.bool)
    for b in range(B):
        window = ngrams(windows[b].tolist())
        for c in range(C):
            out[b, c] = any(g in window for g in ngrams(passages[b, c][mask[b, c]].tolist()))
    return out


def without_source(holds: torch.Tensor, k: int) -> torch.Tensor:
    """holds (B, C) from `holds_window_text`, candidates best first -> (B, k) indices of the k best candidates
    that do not hold the window's text (those that do only fill in, last, when fewer than k others exist)."""
    C = holds.shape[1]
    rank = torch.arange(C)[None, :] + holds.long() * C  # (B, C): holding candidates sort after all others
    return rank.argsort(dim=1)[:, :k]
