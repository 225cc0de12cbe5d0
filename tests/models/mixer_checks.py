"""Checks every sequence mixer's tests share: token-by-token stepping and causality."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def step_through(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D) -> (B, L, D), one `step` per position from a fresh state."""
    state = mixer.allocate_state(x.shape[0], max_len=x.shape[1])
    return torch.stack([mixer.step(x[:, t], state) for t in range(x.shape[1])], dim=1)


@torch.no_grad()
def assert_causal(mixer: nn.Module, x: torch.Tensor, cuts: Iterable[int]) -> None:
    """Changing the inputs after position t leaves outputs up to t unchanged and changes some after it."""
    y = mixer(x)
    for t in cuts:
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        y2 = mixer(changed)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


@torch.no_grad()
def assert_step_and_prefill_match(mixer: nn.Module, x: torch.Tensor, y: torch.Tensor, state_key: str) -> None:
    """Stepping token by token and one parallel prefill both give forward's y (B, L, D) and the same state."""
    state = mixer.allocate_state(x.shape[0], x.shape[1])
    torch.testing.assert_close(torch.stack([mixer.step(x[:, t], state) for t in range(x.shape[1])], 1), y)
    pre = mixer.allocate_state(x.shape[0], x.shape[1])
    torch.testing.assert_close(mixer.prefill(x, pre), y)
    torch.testing.assert_close(pre[state_key], state[state_key])
