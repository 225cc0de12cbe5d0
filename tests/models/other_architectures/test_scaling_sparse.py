"""Scaling Transformer: sparse FFN (one unit per block; decoding path == masked dense) and sparse QKV attention."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.ffn.sparse_ffn import SparseFFN
from hybrid_pretrain.models.generation import generate
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers.sparse_attention import SparseQKVAttention
from hybrid_pretrain.tests.models.other_architectures.fixed_batch import fixed_batch_losses

OPTIONS = {"sparse_ffn": {"block_size": 8, "controller_rank": 8}, "sparse_attention": {"modules": 8, "kernel": 3}}


def test_one_unit_per_block_and_straight_through(make_cfg) -> None:
    ffn = SparseFFN(make_cfg(options=OPTIONS), 0)
    x = torch.randn(2, 5, 32)
    for training in (True, False):
        mask = ffn.train(training).select(x)
        assert mask.shape == (2, 5, 128 // 8, 8) and torch.equal(mask.sum(-1), torch.ones(2, 5, 16))
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    ffn.train()(x).sum().backward()  # the hard mask carries the soft gradient to the controller
    assert ffn.controller_down.weight.grad.abs().sum() > 0 and ffn.controller_up.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_decoding_path_equals_masked_dense(make_cfg) -> None:
    ffn = SparseFFN(make_cfg(options=OPTIONS), 0).double().eval()
    for p in ffn.parameters():
        p.normal_()
    x = torch.randn(7, 32, dtype=torch.float64)
    dense = ffn.masked_dense(x, ffn.select(x))
    torch.testing.assert_close(ffn.sparse_units(x), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ffn(x), dense, rtol=1e-10, atol=1e-10)  # (B, D) at inference takes the sparse path
    full = ffn.masked_dense(x, torch.ones(7, 16, 8, dtype=torch.float64))
    assert (full - dense).abs().max() > 1e-3  # the selection really drops units


@torch.no_grad()
def test_sparse_attention_causal_and_step(make_cfg) -> None:
    mixer = SparseQKVAttention(make_cfg(options=OPTIONS, rotary_dim=4), 0).eval()
    x = torch.randn(2, 12, 32)
    y = mixer(x)
    changed = x.clone()
    changed[:, 7:] += 1.0
    torch.testing.assert_close(mixer(changed)[:, :7], y[:, :7], rtol=1e-5, atol=1e-5)
    state = mixer.allocate_state(2, max_len=12)
    stepped = torch.stack([mixer.step(x[:, t], state) for t in range(12)], dim=1)
    torch.testing.assert_close(stepped, y, rtol=1e-5, atol=1e-5)
    qkv = mixer.mult_d.numel() + mixer.mult_e.numel() + sum(p.numel() for p in mixer.convs.parameters())
    assert qkv < 3 * 32 * 32 / 3  # a third of a dense QKV projection's weights


@torch.no_grad()
def test_decoding_gives_the_forward_tokens(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="QQ", ffn="SS", options=OPTIONS)).eval()
    prompt = torch.randint(0, 64, (2, 4))
    out = generate(model, prompt, max_new_tokens=10)  # steps: sparse units, KV cache, conv buffer
    logits = model(out)  # full forward: masked dense
    torch.testing.assert_close(out[:, 4:], logits[:, 3:-1].argmax(-1))
    state = model.allocate_state(2, max_len=out.shape[1])
    stepped = torch.stack([model.step(out[:, t], state) for t in range(out.shape[1])], dim=1)
    torch.testing.assert_close(stepped, logits, rtol=1e-4, atol=1e-4)


def test_options_checked(make_cfg) -> None:
    with pytest.raises(ConfigError, match="sparse_ffn.block_size"):
        SparseFFN(make_cfg(options={"sparse_ffn": {"block_size": 48}}), 0)
    with pytest.raises(ConfigError, match="sparse_attention.kernel"):
        SparseQKVAttention(make_cfg(options={"sparse_attention": {"kernel": 2}}), 0)


@pytest.mark.slow
def test_trains() -> None:
    losses = fixed_batch_losses("configs/debug_sparse.yaml", overrides=(
        "model.options.sparse_ffn.block_size=8", "model.options.sparse_attention.modules=8"))
    assert losses[-1] < 0.6 * losses[0], losses
