"""Pixelated Butterfly: block-sparse path == materialised matrix (forward, backward), fewer parameters, trains."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.butterfly_mlp import ButterflyMLP
from hybrid_pretrain.models.ffn.mlp import MLP
from hybrid_pretrain.models.layers.butterfly import ButterflyLinear, flat_butterfly_pattern
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers.attention import Attention
from hybrid_pretrain.models.mixers.butterfly_attention import ButterflyAttention
from hybrid_pretrain.tests.models.other_architectures.fixed_batch import fixed_batch_losses


def test_pattern_is_the_flat_butterfly() -> None:
    mask = flat_butterfly_pattern(8, 8)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    xor = i ^ j
    assert torch.equal(mask, (xor == 0) | (xor == 1) | (xor == 2) | (xor == 4))
    assert torch.equal(flat_butterfly_pattern(8, 8, levels=1), (xor == 0) | (xor == 1))
    assert torch.equal(flat_butterfly_pattern(16, 8), mask.repeat(2, 1))  # rectangular: a column of squares


@pytest.mark.parametrize("shape", [(64, 64, 16, 0), (32, 96, 8, 0), (128, 32, 16, 0), (64, 64, 8, 2)])
def test_fast_path_equals_dense_matrix(shape: tuple[int, int, int, int]) -> None:
    n_in, n_out, block, levels = shape
    layer = ButterflyLinear(n_in, n_out, block, levels=levels, rank=4).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 5, n_in, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 5, n_out, dtype=torch.float64)
    grads = []
    for fn in (layer, layer.forward_dense):
        y = fn(x)
        grads.append((y, *torch.autograd.grad(y, [x, *layer.parameters()], grad_out)))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    dense = layer.dense_weight() - layer.u @ layer.v  # blocks only: zero outside the pattern
    pattern = flat_butterfly_pattern(n_out // block, n_in // block, levels)
    outside = ~pattern.repeat_interleave(block, 0).repeat_interleave(block, 1)
    assert dense[outside].abs().sum() == 0 and dense[~outside].abs().min() > 0


def test_fewer_parameters_than_dense() -> None:
    cfg = ModelConfig(vocab_size=256, d_model=256, n_heads=4, layers="PPPP", ffn="PPPP",
                      options={"butterfly_mlp": {"block_size": 16}, "butterfly_attention": {"block_size": 16}})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ButterflyMLP(cfg, 0)) < 0.45 * count(MLP(cfg, 0))
    assert count(ButterflyAttention(cfg, 0)) < 0.45 * count(Attention(cfg, 0))
    assert ButterflyLinear(256, 256, 16, rank=16).density == pytest.approx((16 * 5 * 256 + 2 * 16 * 256) / 256**2)
    dense = ModelConfig(vocab_size=256, d_model=256, n_heads=4, layers="AAAA")
    assert count(LanguageModel(cfg)) < 0.5 * count(LanguageModel(dense))


def test_attention_step_equals_forward(make_cfg) -> None:
    cfg = make_cfg(layers="P", options={"butterfly_attention": {"block_size": 8, "rank": 4}})
    mixer = ButterflyAttention(cfg, 0).eval()
    x = torch.randn(2, 9, cfg.d_model)
    with torch.no_grad():
        state = mixer.allocate_state(2, max_len=9)
        stepped = torch.stack([mixer.step(x[:, t], state) for t in range(9)], dim=1)
        torch.testing.assert_close(stepped, mixer(x), rtol=1e-5, atol=1e-5)


def test_block_size_must_fit(make_cfg) -> None:
    with pytest.raises(ConfigError, match="butterfly_mlp.block_size"):
        ButterflyMLP(make_cfg(options={"butterfly_mlp": {"block_size": 12}}), 0)


@pytest.mark.slow
def test_trains() -> None:
    losses = fixed_batch_losses("configs/debug_butterfly.yaml", overrides=(
        "model.options.butterfly_mlp.block_size=8", "model.options.butterfly_attention.block_size=8"))
    assert losses[-1] < 0.6 * losses[0], losses
