"""StructFormer: dependency distributions from distances/heights (hand case, validity, causal == prefix parse),
causality of the whole model, and that it trains."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.structformer import StructFormer, boundaries, dependency_distributions, span_heads
from hybrid_pretrain.tests.models.other_architectures.fixed_batch import fixed_batch_losses

HARD = torch.tensor(60.0, dtype=torch.float64)  # sharp sigmoids/softmax: the soft parse becomes the hard one


def test_hand_computed_tree() -> None:
    # "the cat sat": heights 0.5, 2.5, 3; gaps the|cat 0.2, cat|sat 2.0 (the last gap is the sequence end).
    # the: crosses gap 0 (0.2 < 0.5) not gap 1 -> constituent "the cat", head cat.
    # cat: crosses both gaps (< 2.5) -> "the cat sat", head sat.   sat: heads the whole sentence -> root.
    distance = torch.tensor([[0.2, 2.0, 0.0]], dtype=torch.float64)
    height = torch.tensor([[0.5, 2.5, 3.0]], dtype=torch.float64)
    expected_parent = torch.tensor([[[0, 1, 0], [0, 0, 1], [0, 0, 0]]], dtype=torch.float64)
    parent, child = dependency_distributions(distance, height, HARD, HARD, causal=False)
    torch.testing.assert_close(parent, expected_parent, atol=1e-6, rtol=0)
    torch.testing.assert_close(child, expected_parent.transpose(1, 2), atol=1e-6, rtol=0)
    # Causal: row 1 parses "the cat" alone (cat is its root, "the" its child); row 2 is the full parse.
    parent, child = dependency_distributions(distance, height, HARD, HARD, causal=True)
    torch.testing.assert_close(parent, torch.zeros(1, 3, 3, dtype=torch.float64), atol=1e-6, rtol=0)  # each its root
    torch.testing.assert_close(child, torch.tensor([[[0, 0, 0], [1, 0, 0], [0, 1, 0]]], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_distributions_are_valid_probabilities() -> None:
    gen = torch.Generator().manual_seed(0)
    distance, height = torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen)
    scale_d, scale_h = torch.tensor(1.7), torch.tensor(0.8)
    p_left, survival, p_right = boundaries(distance, height, scale_d)
    ones = torch.ones(3, 9)
    torch.testing.assert_close(p_left.sum(-1), ones)
    torch.testing.assert_close(p_right.sum(-1), ones)
    assert (p_left >= 0).all() and (p_right >= 0).all() and (survival <= 1).all()
    assert (p_left.triu(1) == 0).all() and (p_right.tril(-1) == 0).all()
    heads = span_heads(height, scale_h)  # (B, a, b, h)
    spans = torch.ones(9, 9).triu().bool()
    torch.testing.assert_close(heads.sum(-1)[:, spans], torch.ones(3, int(spans.sum())))
    for causal in (False, True):
        parent, child = dependency_distributions(distance, height, scale_d, scale_h, causal=causal)
        assert ((parent >= 0) & (parent <= 1)).all() and ((child >= 0) & (child <= 1 + 1e-6)).all()
        assert (parent.sum(-1) <= 1 + 1e-5).all()  # the rest of the mass: the token is its own head (a root)
        assert (parent.diagonal(dim1=1, dim2=2) == 0).all() and (child.diagonal(dim1=1, dim2=2) == 0).all()
        if causal:
            assert (parent.triu(1) == 0).all() and (child.triu(1) == 0).all()


def test_causal_row_is_the_parse_of_the_prefix() -> None:
    gen = torch.Generator().manual_seed(1)
    distance = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    height = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    scale_d, scale_h = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    parent, child = dependency_distributions(distance, height, scale_d, scale_h, causal=True)
    for i in range(8):
        prefix_parent, prefix_child = dependency_distributions(distance[:, : i + 1], height[:, : i + 1], scale_d,
                                                               scale_h, causal=False)
        torch.testing.assert_close(parent[:, i, : i + 1], prefix_parent[:, i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(child[:, i, : i + 1], prefix_child[:, i], rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_model_is_causal(make_cfg) -> None:
    model = StructFormer(make_cfg(arch="structformer", layers="AA", options={"structformer": {"conv_size": 3}}))
    ids = torch.randint(0, 64, (2, 16))
    logits = model(ids)
    changed = ids.clone()
    changed[:, 11:] = (changed[:, 11:] + 1) % 64
    torch.testing.assert_close(model(changed)[:, :11], logits[:, :11], rtol=1e-5, atol=1e-5)
    assert (model(changed)[:, 11:] - logits[:, 11:]).abs().max() > 1e-4


def test_layers_must_be_attention(make_cfg) -> None:
    with pytest.raises(ConfigError, match="all 'A'"):
        StructFormer(make_cfg(arch="structformer", layers="AH"))


@pytest.mark.slow
def test_trains() -> None:
    losses = fixed_batch_losses("configs/debug_structformer.yaml")
    assert losses[-1] < 0.6 * losses[0], losses
