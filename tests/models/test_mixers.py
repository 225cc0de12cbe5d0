"""The mixer contract, over every registered mixer: causal, step() = forward(), prefill() + steps = forward()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybrid_pretrain.models.mixers import MIXERS, build_mixer
from hybrid_pretrain.models.mixers.attention import Attention, apply_rotary
from hybrid_pretrain.models.mixers.h3 import H3
from hybrid_pretrain.tests.models.mixer_checks import assert_causal, assert_step_and_prefill_match, step_through

# Every registered mixer, plus variants whose code paths differ. A new mixer is covered by registering it.
MIXER_CASES = {name: (name, {}) for name in MIXERS.names()} | {
    "attention-rotary": ("attention", {"rotary_dim": 4}),
    "h3-head_dim2": ("h3", {"h3_head_dim": 2}),
    "h3-head_dim8": ("h3", {"h3_head_dim": 8}),  # short L: the quadratic memory readout (kernels.ssm_memory)
}
L = 40  # spans several blocks/chunks of the block-wise mixers at their small test sizes


@pytest.fixture(params=list(MIXER_CASES))
def mixer(request: pytest.FixtureRequest, make_cfg) -> nn.Module:
    name, overrides = MIXER_CASES[request.param]
    torch.manual_seed(0)
    return build_mixer(name, make_cfg(**overrides), layer_idx=0).eval()


def test_causal(mixer: nn.Module) -> None:
    assert_causal(mixer, torch.randn(2, L, 32), (0, 13, L - 2))


@torch.no_grad()
def test_step_equals_forward(mixer: nn.Module) -> None:
    x = torch.randn(3, L, 32)
    y = mixer(x)
    torch.testing.assert_close(step_through(mixer, x), y, rtol=1e-4, atol=1e-4 * y.abs().max().item())


@torch.no_grad()
def test_prefill_then_steps_equals_forward(mixer: nn.Module) -> None:
    """A parallel prefill of the first positions, then steps: forward's outputs, so the state is the steps' state."""
    if not hasattr(mixer, "prefill"):
        pytest.skip(f"{type(mixer).__name__} decodes by stepping only (generation steps through the prompt)")
    x = torch.randn(3, L, 32)
    y = mixer(x)
    atol = 1e-4 * y.abs().max().item()
    for split in (1, 17, L):
        state = mixer.allocate_state(3, max_len=L)
        head = mixer.prefill(x[:, :split], state)
        tail = [mixer.step(x[:, t], state) for t in range(split, L)]
        got = torch.cat([head, torch.stack(tail, 1)], 1) if tail else head
        torch.testing.assert_close(got, y, rtol=1e-4, atol=atol)


def test_state_is_batch_first(mixer: nn.Module) -> None:
    """Every tensor of the decoding state has the batch as its first dim (caches reorder and split rows by it)."""
    state = mixer.allocate_state(3, max_len=L)
    leaves = [v for v in (state.values() if isinstance(state, dict) else [state]) if isinstance(v, torch.Tensor)]
    assert leaves and all(v.shape[0] == 3 for v in leaves), {k: getattr(v, "shape", v) for k, v in state.items()}


@pytest.mark.parametrize("head_dim", [1, 2, 8])
@torch.no_grad()
def test_h3_prefill_builds_the_stepped_state(make_cfg, head_dim: int) -> None:
    """One parallel prefill gives forward's outputs and the very state token-by-token stepping reaches."""
    mixer = H3(make_cfg(h3_head_dim=head_dim), layer_idx=0).eval()
    x = torch.randn(2, 70, 32)  # longer than the shift SSM's N taps and several Vandermonde chunks
    assert_step_and_prefill_match(mixer, x, mixer(x), "diag")
    state, pre = mixer.allocate_state(2, 70), mixer.allocate_state(2, 70)
    for t in range(70):
        mixer.step(x[:, t], state)
    mixer.prefill(x, pre)
    torch.testing.assert_close(pre["shift"], state["shift"])


def test_attention_cache_overflow_raises(make_cfg) -> None:
    attn = Attention(make_cfg(), 0)
    state = attn.allocate_state(1, max_len=2)
    with torch.no_grad():
        attn.step(torch.randn(1, 32), state)
        attn.step(torch.randn(1, 32), state)
        with pytest.raises(RuntimeError, match="cache is full"):
            attn.step(torch.randn(1, 32), state)


def test_rotary_encodes_relative_position() -> None:
    """With rotary, attention scores depend on positions only through their difference."""
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        return (apply_rotary(q, torch.tensor([i]), 8) * apply_rotary(k, torch.tensor([j]), 8)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 3))


@pytest.mark.parametrize("cls", [Attention, H3])
def test_builds_on_meta_device(cls: type, make_cfg) -> None:
    with torch.device("meta"):
        mixer = cls(make_cfg(d_model=2560, n_heads=20, h3_d_state=64), 0)
    assert all(p.is_meta for p in mixer.parameters())
