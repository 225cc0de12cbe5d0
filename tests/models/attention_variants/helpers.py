"""Shared by the attention-variant tests: step a mixer token by token, and train a model on one fixed batch."""

from __future__ import annotations

import torch
from torch import nn

from tests.models.one_batch import train_on_one_batch


def step_through(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D) -> (B, L, D), one `step` per position from a fresh state."""
    state = mixer.allocate_state(x.shape[0], max_len=x.shape[1])
    return torch.stack([mixer.step(x[:, t], state) for t in range(x.shape[1])], dim=1)


def fixed_batch_losses(config: str, steps: int, overrides: list[str], batch: int = 2, seed: int = 0) -> list[float]:
    """`config`'s model (with overrides, vocab 256) trained `steps` AdamW steps on one random batch."""
    return train_on_one_batch(config, steps, [*overrides, "model.vocab_size=256", "data.vocab_size=256"], batch,
                              vocab=256, seed=seed)
