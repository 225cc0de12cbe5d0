"""The S4D baseline mixer: registered as 'S', causal, step == forward, prefill == stepping."""

from __future__ import annotations

import torch

from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers import build_mixer
from hybrid_pretrain.models.mixers.s4d import S4D
from hybrid_pretrain.models.mixers.ssm import DiagonalSSM
from hybrid_pretrain.models.pattern import parse_pattern


def test_symbol_and_registry(make_cfg) -> None:
    assert parse_pattern("HSA").layers[1].mixer == "s4d"
    assert isinstance(build_mixer("s4d", make_cfg(), 0), S4D)
    assert isinstance(LanguageModel(make_cfg(layers="SS")).blocks[0].mixer, S4D)


@torch.no_grad()
def test_causal_and_step_equals_forward(make_cfg) -> None:
    mixer = S4D(make_cfg(), 0).eval()
    x = torch.randn(2, 16, 32)
    y = mixer(x)
    changed = x.clone()
    changed[:, 9:] += 1.0
    torch.testing.assert_close(mixer(changed)[:, :9], y[:, :9])
    state = mixer.allocate_state(2, 16)
    stepped = torch.stack([mixer.step(x[:, t], state) for t in range(16)], dim=1)
    torch.testing.assert_close(stepped, y, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_state_from_sequence_equals_recurrence() -> None:
    ssm = DiagonalSSM(6, 8).double()
    u = torch.randn(3, 6, 25, dtype=torch.float64)
    state = ssm.allocate_state((3,))
    for t in range(25):
        _, state = ssm.step(u[..., t], state)
    torch.testing.assert_close(ssm.state_after(u), state)
