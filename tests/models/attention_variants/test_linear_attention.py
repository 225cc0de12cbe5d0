"""Linear Transformer: recurrent form ≡ chunkwise parallel form ≡ the quadratic formula; causal; constant state."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.mixers.attention import apply_rotary
from hybrid_pretrain.models.mixers.linear_attention import LinearAttention, causal_linear_attention, feature_map
from hybrid_pretrain.tests.models.attention_variants.helpers import fixed_batch_losses
from hybrid_pretrain.tests.models.mixer_checks import assert_causal, step_through


def quadratic_reference(q, k, v, q_num=None, k_num=None) -> torch.Tensor:
    """The paper's eq. (4) (RoFormer's eq. 19 with rotated numerator features) with explicit causal (L, L)
    similarity matrices: (B, H, L, d) -> (B, H, L, dv)."""
    q_num, k_num = (q, k) if q_num is None else (q_num, k_num)
    sim_num = torch.einsum("bhid,bhjd->bhij", q_num, k_num).tril()
    sim_den = torch.einsum("bhid,bhjd->bhij", q, k).tril()
    return torch.einsum("bhij,bhjd->bhid", sim_num, v) / sim_den.sum(-1, keepdim=True)


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunkwise_equals_quadratic(chunk: int, rotary: bool) -> None:
    q, k = feature_map(torch.randn(2, 3, 23, 8)), feature_map(torch.randn(2, 3, 23, 8))
    v = torch.randn(2, 3, 23, 6)
    rot = (apply_rotary(q, torch.arange(23), 4), apply_rotary(k, torch.arange(23), 4)) if rotary else (None, None)
    torch.testing.assert_close(causal_linear_attention(q, k, v, chunk, *rot), quadratic_reference(q, k, v, *rot),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary_dim", [0, 4])
@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_recurrent_equals_parallel(make_cfg, chunk: int, rotary_dim: int) -> None:
    cfg = make_cfg(rotary_dim=rotary_dim, options={"linear_attention": {"chunk_size": chunk}})
    mixer = LinearAttention(cfg, 0).eval()
    x = torch.randn(3, 21, 32)
    with torch.no_grad():
        y = mixer(x)
        torch.testing.assert_close(step_through(mixer, x), y, rtol=1e-4, atol=1e-5)
        state = mixer.allocate_state(3, max_len=21)
        torch.testing.assert_close(mixer.prefill(x[:, :13], state), y[:, :13], rtol=1e-5, atol=1e-6)
        rest = torch.stack([mixer.step(x[:, t], state) for t in range(13, 21)], dim=1)
        torch.testing.assert_close(rest, y[:, 13:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rotary_dim", [0, 4])
def test_causal(make_cfg, rotary_dim: int) -> None:
    mixer = LinearAttention(make_cfg(rotary_dim=rotary_dim, options={"linear_attention": {"chunk_size": 4}}), 0).eval()
    assert_causal(mixer, torch.randn(2, 16, 32), (0, 5, 14))


@torch.no_grad()
def test_state_size_independent_of_context(make_cfg) -> None:
    mixer = LinearAttention(make_cfg(rotary_dim=4), 0).eval()

    def shapes(state: dict) -> dict:
        return {k: v.shape for k, v in state.items() if isinstance(v, torch.Tensor)}

    short, long = mixer.allocate_state(2, max_len=8), mixer.allocate_state(2, max_len=100_000)
    assert shapes(short) == shapes(long)
    before = shapes(long)
    for _ in range(200):
        mixer.step(torch.randn(2, 32), long)
    assert shapes(long) == before and set(long) == {"S", "z", "pos"}
    assert sum(v.numel() for v in before.values()) == 2 * 4 * (8 * 8 + 8)  # B * H * (hd² + hd)


def test_bad_chunk_size_is_named(make_cfg) -> None:
    with pytest.raises(ConfigError, match="linear_attention.chunk_size"):
        LinearAttention(make_cfg(options={"linear_attention": {"chunk_size": 0}}), 0)


def test_debug_config_trains() -> None:
    losses = fixed_batch_losses("configs/debug_linear_attention.yaml", 25,
                                ["model.d_model=64", "data.seq_len=64", "model.options.linear_attention.chunk_size=16"])
    assert losses[-1] < 0.6 * losses[0], losses
