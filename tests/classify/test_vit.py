"""ViT: patch shapes, patch-permutation invariance without positions, and it learns digits."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.classify.config import load_config
from hybrid_pretrain.classify.train import train_classifier
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.vit import ViT


def _vit(patch: int, layers: str = "AA") -> ViT:
    cfg = ModelConfig(d_model=32, n_heads=4, layers=layers)
    return ViT(cfg, image_size=8, patch_size=patch, channels=1, num_classes=10).eval()


@pytest.mark.parametrize("patch, n", [(2, 16), (4, 4), (8, 1)])
def test_patch_shapes(patch: int, n: int) -> None:
    vit = _vit(patch)
    images = torch.rand(3, 1, 8, 8)
    assert vit.patchify(images).shape == (3, n, 32) and vit.pos_embed.shape == (1, n + 1, 32)
    assert vit(images).shape == (3, 10)
    # Patch i is the row-major i-th p x p square: its embedding is the conv applied to that square alone.
    square = images[:, :, patch : 2 * patch, :patch] if n > 1 else images
    index = 8 // patch if n > 1 else 0
    torch.testing.assert_close(vit.patchify(images)[:, index], vit.patch_embed(square).flatten(1))


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ConfigError, match="patch_size"):
        _vit(3)
    with pytest.raises(ConfigError, match="must all be 'A'"):
        _vit(2, layers="AS")
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        _vit(2)(torch.rand(2, 8, 8))


@torch.no_grad()
def test_without_positions_permuting_patches_leaves_logits_unchanged() -> None:
    vit = _vit(2)
    images = torch.rand(2, 1, 8, 8)
    patches = images.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, 1, 4, 4, 2, 2): the 16 squares
    perm = torch.randperm(16)
    shuffled = patches.reshape(2, 1, 16, 2, 2)[:, :, perm].reshape(2, 1, 4, 4, 2, 2)
    shuffled = shuffled.permute(0, 1, 2, 4, 3, 5).reshape(2, 1, 8, 8)  # squares moved, each kept intact
    torch.testing.assert_close(vit.patchify(shuffled), vit.patchify(images)[:, perm])  # equivariant
    assert (vit(shuffled) - vit(images)).abs().max() > 1e-4  # learned positions see the order
    vit.pos_embed.zero_()
    torch.testing.assert_close(vit(shuffled), vit(images), rtol=1e-5, atol=1e-5)  # the class token pools a set


def test_short_training_beats_chance_by_far() -> None:
    run = load_config(None, model="vit", input="images", layers="AA", d_model=32, n_heads=2, patch_size=4, epochs=2,
                      batch_size=32, lr=3e-3)
    _, acc, losses = train_classifier(run, progress=False, log=lambda _: None)
    assert losses[-1] < 0.6 * losses[0] and acc > 0.6, (acc, losses)  # chance is 0.1
