"""Perceiver AR: causal end to end, loss only on the latent positions, trains on a fixed batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.tests.models.attention_variants.helpers import fixed_batch_losses

L, N = 40, 12


@pytest.fixture
def model(make_cfg):
    cfg = make_cfg(arch="perceiver_ar", layers="AA", rotary_dim=4, options={"perceiver_ar": {"num_latents": N}})
    return build_arch(cfg).eval()


@torch.no_grad()
def test_logits_cover_only_latents(model) -> None:
    ids = torch.randint(0, 64, (2, L))
    assert model(ids).shape == (2, N, 64)
    assert model(ids[:, :5]).shape == (2, 5, 64)  # a context shorter than N: every position is a latent


@torch.no_grad()
def test_causal_end_to_end(model) -> None:
    """Changing token t changes no logit of a position < t (latent i sits at position L-N+i)."""
    ids = torch.randint(0, 64, (2, L))
    logits = model(ids)
    for t in (0, 10, L - N, L - N + 5, L - 1):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 64
        new = model(changed)
        first_affected = max(0, t - (L - N))  # latent index of position t
        torch.testing.assert_close(new[:, :first_affected], logits[:, :first_affected])
        assert not torch.allclose(new[:, first_affected:], logits[:, first_affected:])


@torch.no_grad()
def test_loss_only_on_latent_positions(model) -> None:
    ids = torch.randint(0, 64, (2, L))
    labels = torch.randint(0, 64, (2, L))
    scrambled = labels.clone()
    scrambled[:, : L - N] = torch.randint(0, 64, (2, L - N))
    assert model(ids, labels=labels).item() == model(ids, labels=scrambled).item()
    expected = F.cross_entropy(model(ids).flatten(0, 1), labels[:, L - N :].flatten())
    torch.testing.assert_close(model(ids, labels=labels), expected)


def test_bad_num_latents_is_named(make_cfg) -> None:
    with pytest.raises(ConfigError, match="perceiver_ar.num_latents"):
        build_arch(make_cfg(arch="perceiver_ar", options={"perceiver_ar": {"num_latents": 0}}))


def test_debug_config_trains() -> None:
    losses = fixed_batch_losses("configs/debug_perceiver_ar.yaml", 25,
                                ["model.d_model=64", "model.layers=AA", "data.seq_len=96",
                                 "model.options.perceiver_ar.num_latents=32"])
    assert losses[-1] < 0.6 * losses[0], losses
