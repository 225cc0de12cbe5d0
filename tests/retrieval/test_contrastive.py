"""The generic bi-encoder's contrastive training: its loss against the InfoNCE formula, and its crops."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.retrieval.contrastive import ContrastiveConfig, info_nce, random_crop


def test_info_nce_matches_the_formula():
    q = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = 0.5
    s = (q @ p.T) / math.sqrt(2) / t  # logits (2, 2): row i's positive is column i
    expected = sum(-(s[i, i] - torch.logsumexp(s[i], 0)) for i in range(2)) / 2
    assert info_nce(q, p, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert info_nce(q, q, 0.01).item() < info_nce(q, q.flip(0), 0.01).item()  # matching pairs score lower


def test_random_crop_is_a_contiguous_span_of_at_least_the_minimum():
    rng = random.Random(0)
    tokens = list(range(40))
    for _ in range(200):
        crop = random_crop(tokens, 0.5, rng)
        assert len(crop) >= 20 and crop == tokens[crop[0] : crop[0] + len(crop)]
    assert random_crop([7], 0.5, rng) == [7]


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", 1), ("temperature", 0.0), ("min_crop", 0.0)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ConfigError):
        ContrastiveConfig(**{field: value}).validate()
