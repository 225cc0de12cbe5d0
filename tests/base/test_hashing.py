"""The token-span hash (Atlas's source filter, the document table) and the cached fingerprint of frozen weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hybrid_pretrain.base import hashing
from hybrid_pretrain.base.hashing import token_span_hashes

real_sha256 = hashing.state_dict_sha256


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


def test_a_frozen_module_is_hashed_once_until_its_weights_change(monkeypatch):
    calls = []
    monkeypatch.setattr(hashing, "state_dict_sha256", lambda m: calls.append(m) or real_sha256(m))
    tower = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).requires_grad_(False)
    first = hashing.weights_fingerprint(tower)
    assert hashing.weights_fingerprint(tower) == first == real_sha256(tower) and len(calls) == 1  # cached
    with torch.no_grad():
        tower[0].weight.add_(1.0)  # an in-place update
    second = hashing.weights_fingerprint(tower)
    assert second != first and second == real_sha256(tower) and len(calls) == 2
    tower.load_state_dict(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).state_dict())  # a reload
    assert hashing.weights_fingerprint(tower) not in (first, second) and len(calls) == 3
    assert hashing.weights_fingerprint(tower) == real_sha256(tower) and len(calls) == 3


def test_a_trainable_module_is_hashed_on_every_call():
    tower = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(tower.parameters(), lr=0.1)
    first = hashing.weights_fingerprint(tower)
    tower(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert hashing.weights_fingerprint(tower) != first
    with torch.no_grad():
        tower.weight.data.mul_(2.0)  # through .data: no version bump, still seen since nothing is cached
    assert hashing.weights_fingerprint(tower) == real_sha256(tower)
