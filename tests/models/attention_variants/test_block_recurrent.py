"""Block-Recurrent Transformer: the state carries information past the attention window, the layer is causal,
gates stay in (0, 1), and token-by-token decoding equals forward."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.mixers.block_recurrent import BlockRecurrent, Gate
from hybrid_pretrain.tests.models.attention_variants.helpers import fixed_batch_losses
from hybrid_pretrain.tests.models.mixer_checks import assert_causal, step_through

W = 16


def cell(make_cfg, **opts) -> BlockRecurrent:
    options = {"block_recurrent": {"block_len": W, "num_states": 4, **opts}}
    return BlockRecurrent(make_cfg(rotary_dim=4, options=options), 0).eval()


@pytest.mark.parametrize("gate", ["lstm", "fixed"])
@torch.no_grad()
def test_state_carries_information_beyond_the_window(make_cfg, gate: str) -> None:
    """Token 0 (block 0) is outside block 2's attention window (blocks 1-2), yet block 2's output depends on it."""
    mixer = cell(make_cfg, gate=gate)
    x = torch.randn(2, 3 * W, 32)
    changed = x.clone()
    changed[:, 0] += 3.0
    y, y2 = mixer(x), mixer(changed)
    assert (y2[:, 2 * W :] - y[:, 2 * W :]).abs().max() > 1e-4
    # Without the state path (the cross-attention half of each head's [self; cross] input to out_proj zeroed),
    # block 2 does not see token 0 at all.
    cross_columns = torch.arange(64).view(4, 2, 8)[:, 1].flatten()  # (H, [self; cross], hd)
    mixer.out_proj.weight[:, cross_columns] = 0.0
    torch.testing.assert_close(mixer(changed)[:, 2 * W :], mixer(x)[:, 2 * W :])


def test_causal(make_cfg) -> None:
    assert_causal(cell(make_cfg), torch.randn(2, 3 * W + 5, 32), (0, W - 1, W, 2 * W + 3))


@pytest.mark.parametrize("gate", ["lstm", "fixed"])
def test_gates_bounded(make_cfg, gate: str) -> None:
    g = Gate(32, gate)
    h = torch.randn(100, 32) * 1e3  # saturating inputs
    forget, write = g.coefficients(h)
    for coef in (forget, write):
        assert torch.isfinite(coef).all() and (coef >= 0).all() and (coef <= 1).all()
    if gate == "fixed":
        torch.testing.assert_close(forget + write, torch.ones_like(forget))  # a convex blend of old and new
    mixer = cell(make_cfg, gate=gate)
    for gate_module in (mixer.attn_gate, mixer.mlp_gate):
        forget, write = gate_module.coefficients(torch.randn(4, 32) * 50)
        assert ((forget > 0) & (forget < 1)).all() or gate == "lstm"
        assert ((forget >= 0) & (forget <= 1) & (write >= 0) & (write <= 1)).all()


@pytest.mark.parametrize("gate", ["lstm", "fixed"])
@torch.no_grad()
def test_step_equals_forward(make_cfg, gate: str) -> None:
    mixer = cell(make_cfg, gate=gate)
    x = torch.randn(2, 3 * W + 7, 32)
    torch.testing.assert_close(step_through(mixer, x), mixer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", [5, W, W + 3, 2 * W])
@torch.no_grad()
def test_prefill_then_step_equals_forward(make_cfg, split: int) -> None:
    mixer = cell(make_cfg)
    x = torch.randn(2, 3 * W + 7, 32)
    y = mixer(x)
    state = mixer.allocate_state(2, max_len=x.shape[1])
    torch.testing.assert_close(mixer.prefill(x[:, :split], state), y[:, :split])
    rest = torch.stack([mixer.step(x[:, t], state) for t in range(split, x.shape[1])], dim=1)
    torch.testing.assert_close(rest, y[:, split:], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_scan_state_equals_decoding_state(make_cfg) -> None:
    """The state `scan` returns is the state decoding reaches; a partial last block does not update it."""
    mixer = cell(make_cfg)
    x = torch.randn(2, 3 * W + 5, 32)
    state = mixer.allocate_state(2, max_len=x.shape[1])
    for t in range(x.shape[1]):
        mixer.step(x[:, t], state)
    _, c = mixer.scan(x)
    assert c.shape == (2, 4, 32)
    torch.testing.assert_close(c, state["c"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixer.scan(x[:, : 3 * W])[1], c)


def test_bad_options_are_named(make_cfg) -> None:
    with pytest.raises(ConfigError, match="block_recurrent.gate"):
        cell(make_cfg, gate="gru")
    with pytest.raises(ConfigError, match="block_recurrent.block_len"):
        cell(make_cfg, block_len=20)


def test_debug_config_trains() -> None:
    small = ["model.d_model=64", "model.layers=BR", "data.seq_len=64", "model.options.bigbird.block=16",
             "model.options.block_recurrent.block_len=16", "model.options.block_recurrent.num_states=4"]
    losses = fixed_batch_losses("configs/debug_block_recurrent.yaml", 25, small)
    assert losses[-1] < 0.6 * losses[0], losses
