"""Mega: equals the loop-by-loop reference (EMA recurrence, per-chunk softmax), causal, step == forward."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers.mega import Mega
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.tests.models.ssm_family2.mega_reference import mega_reference


def _mega(make_cfg, **options) -> Mega:
    m = Mega(make_cfg(layers="MM", d_model=16, options={"mega": {"ema_dim": 4, **options}}), 0).double().eval()
    with torch.no_grad():  # sharper attention than the near-uniform init, so masks matter
        m.qk_scale.normal_()
        m.qk_offset.normal_()
    return m


def test_symbol_registry_and_options(make_cfg) -> None:
    assert parse_pattern("MA").layers[0].mixer == "mega"
    assert isinstance(LanguageModel(make_cfg(layers="MA")).blocks[0].mixer, Mega)
    with pytest.raises(ConfigError, match="chunk_siz"):
        Mega(make_cfg(options={"mega": {"chunk_siz": 4}}), 0)


@pytest.mark.parametrize("chunk", [0, 4, 5])
@pytest.mark.parametrize("bidirectional", [False, True])
@torch.no_grad()
def test_equals_reference(make_cfg, chunk: int, bidirectional: bool) -> None:
    m = _mega(make_cfg, chunk_size=chunk, bidirectional=bidirectional)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    # rotary is computed in fp32 (models.mixers.attention.apply_rotary), hence not fp64-tight
    torch.testing.assert_close(m(x), mega_reference(m, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 4, 5])
@torch.no_grad()
def test_causal_and_step_equals_forward(make_cfg, chunk: int) -> None:
    m = _mega(make_cfg, chunk_size=chunk)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y = m(x)
    changed = x.clone()
    changed[:, 7:] += 1.0
    torch.testing.assert_close(m(changed)[:, :7], y[:, :7])
    state = m.allocate_state(2, 13)
    torch.testing.assert_close(torch.stack([m.step(x[:, t], state) for t in range(13)], 1), y)
    with pytest.raises(RuntimeError, match="full"):
        m.step(x[:, 0], state)
    for split in (1, 8, 9, 12):  # prefill a prompt, then keep stepping: the same outputs
        state = m.allocate_state(2, 13)
        torch.testing.assert_close(m.prefill(x[:, :split], state), y[:, :split])
        rest = [m.step(x[:, t], state) for t in range(split, 13)]
        torch.testing.assert_close(torch.stack(rest, 1), y[:, split:])


@torch.no_grad()
def test_chunks_exchange_information_only_through_the_ema(make_cfg) -> None:
    m = _mega(make_cfg, chunk_size=4)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, 1] += 3.0  # a token of the first chunk
    assert (m(changed)[:, 8:] - m(x)[:, 8:]).abs().max() > 1e-4  # reaches the third chunk via the EMA
    with torch.no_grad():
        m.ema.beta.zero_()  # no EMA memory: X' = SiLU(omega X) is position-wise
    torch.testing.assert_close(m(changed)[:, 4:], m(x)[:, 4:])  # later chunks no longer see it


@torch.no_grad()
def test_bidirectional_reads_the_future_and_cannot_step(make_cfg) -> None:
    m = _mega(make_cfg, bidirectional=True)
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, 8:] += 1.0
    assert (m(changed)[:, :8] - m(x)[:, :8]).abs().max() > 1e-4
    with pytest.raises(RuntimeError, match="bidirectional"):
        m.allocate_state(1, 10)
