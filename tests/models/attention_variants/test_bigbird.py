"""BigBird: the block mask has the configured window/global/random structure, the op equals dense attention with
the expanded token mask, the layer is causal, and decoding matches forward."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.kernels.attention import attention, expand_block_mask
from hybrid_pretrain.models.mixers.bigbird import BigBird, bigbird_block_mask
from hybrid_pretrain.tests.models.attention_variants.helpers import fixed_batch_losses
from hybrid_pretrain.tests.models.mixer_checks import assert_causal, step_through

OPTS = {"block": 16, "window": 1, "num_global": 1, "num_random": 1, "seed": 3}


def bigbird(make_cfg, **opts) -> BigBird:
    return BigBird(make_cfg(max_seq_len=128, rotary_dim=4, options={"bigbird": {**OPTS, **opts}}), 0).eval()


@pytest.mark.parametrize("window,num_global,num_random", [(1, 1, 1), (2, 2, 2), (0, 0, 3), (1, 0, 0)])
def test_block_mask_structure(window: int, num_global: int, num_random: int) -> None:
    n = 12
    mask = bigbird_block_mask(n, window, num_global, num_random, seed=7)[0]
    assert not mask.triu(1).any()  # causal at block level: no future block
    for i in range(n):
        row = mask[i]
        window_blocks = set(range(max(0, i - window), i + 1))
        global_blocks = set(range(min(num_global, i + 1)))
        assert all(row[j] for j in window_blocks | global_blocks)
        others = set(row.nonzero().flatten().tolist()) - window_blocks - global_blocks
        assert len(others) == min(num_random, i + 1 - len(window_blocks | global_blocks))  # random, earlier only
    assert mask[:, :num_global].equal(torch.ones(n, n, dtype=torch.bool).tril()[:, :num_global])  # seen by all


def test_random_blocks_fixed_by_seed_and_prefix_stable() -> None:
    a, b = bigbird_block_mask(16, 1, 1, 2, seed=5), bigbird_block_mask(16, 1, 1, 2, seed=5)
    assert a.equal(b)
    assert not a.equal(bigbird_block_mask(16, 1, 1, 2, seed=6))
    assert bigbird_block_mask(9, 1, 1, 2, seed=5).equal(a[:, :9, :9])  # a shorter sequence sees the same blocks


def test_layers_draw_different_random_blocks(make_cfg) -> None:
    cfg = make_cfg(max_seq_len=256, options={"bigbird": OPTS})
    assert not BigBird(cfg, 0).block_mask(256, torch.device("cpu")).equal(BigBird(cfg, 1).block_mask(256, "cpu"))


@pytest.mark.parametrize("L", [128, 117])
def test_equals_dense_attention_with_expanded_mask(L: int) -> None:
    q, k, v = (torch.randn(2, 4, L, 8, dtype=torch.float64) for _ in range(3))
    block_mask = bigbird_block_mask(-(-L // 16), 1, 1, 1, seed=0)
    got = attention(q, k, v, causal=True, block_mask=block_mask, block=16)
    token_mask = expand_block_mask(block_mask, 16, L, L) & torch.ones(L, L, dtype=torch.bool).tril()  # (1, L, L)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~token_mask, float("-inf"))
    torch.testing.assert_close(got, torch.softmax(scores, -1) @ v)
    # Sparse for real: some earlier keys are hidden from late queries.
    assert not token_mask[0, -1, : L - 32].all()


def test_causal(make_cfg) -> None:
    assert_causal(bigbird(make_cfg), torch.randn(2, 70, 32), (0, 20, 47))


@torch.no_grad()
def test_hidden_block_has_no_influence(make_cfg) -> None:
    """A token in a block the mask hides from query block I does not change block I's output."""
    mixer = bigbird(make_cfg)
    mask = mixer.block_mask(128, torch.device("cpu"))[0]
    i = 7
    hidden = [j for j in range(i) if not mask[i, j]]
    assert hidden
    x = torch.randn(1, 128, 32)
    changed = x.clone()
    changed[:, hidden[0] * 16] += 5.0
    torch.testing.assert_close(mixer(changed)[:, i * 16 : (i + 1) * 16], mixer(x)[:, i * 16 : (i + 1) * 16])


@torch.no_grad()
def test_step_and_prefill_equal_forward(make_cfg) -> None:
    mixer = bigbird(make_cfg)
    x = torch.randn(2, 75, 32)
    y = mixer(x)
    torch.testing.assert_close(step_through(mixer, x), y, rtol=1e-4, atol=1e-5)
    state = mixer.allocate_state(2, max_len=75)
    torch.testing.assert_close(mixer.prefill(x[:, :40], state), y[:, :40])
    rest = torch.stack([mixer.step(x[:, t], state) for t in range(40, 75)], dim=1)
    torch.testing.assert_close(rest, y[:, 40:], rtol=1e-4, atol=1e-5)


def test_bad_block_is_named(make_cfg) -> None:
    with pytest.raises(ConfigError, match="bigbird.block must be a power of two"):
        bigbird(make_cfg, block=24)


def test_debug_config_trains() -> None:
    losses = fixed_batch_losses("configs/debug_bigbird.yaml", 25, ["model.d_model=64", "data.seq_len=96"])
    assert losses[-1] < 0.6 * losses[0], losses
