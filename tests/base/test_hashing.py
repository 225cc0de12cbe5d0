"""The token-span hash both Atlas's source filter and the passage store's document table match text by."""

from __future__ import annotations

import numpy as np

from hybrid_pretrain.base.hashing import token_span_hashes


def test_span_hashes_depend_on_the_span_only_whatever_the_batch_shape_or_stride():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (3, 4, 23))  # small vocabulary: repeated spans
    full = token_span_hashes(ids, 6)  # (3, 4, 18)
    assert full.shape == (3, 4, 18) and full.dtype == np.uint64
    for idx in np.ndindex(3, 4):
        row = ids[idx].tolist()
        assert np.array_equal(token_span_hashes(row, 6), full[idx])
        assert np.array_equal(token_span_hashes(row, 6, step=4), full[idx][::4])
        spans = [tuple(row[s : s + 6]) for s in range(18)]
        same = np.equal.outer(full[idx], full[idx])  # (18, 18): equal hashes exactly where the spans are equal
        assert same.tolist() == [[a == b for b in spans] for a in spans]
    assert token_span_hashes(ids[..., :5], 6).shape == (3, 4, 0)
