"""Shared by the attention-variant tests: step a mixer token by token, and train a model on one fixed batch."""

from __future__ import annotations

import torch
from torch import nn

from launcher.config import load_config
from models.registry import build_arch


def step_through(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D) -> (B, L, D), one `step` per position from a fresh state."""
    state = mixer.allocate_state(x.shape[0], max_len=x.shape[1])
    return torch.stack([mixer.step(x[:, t], state) for t in range(x.shape[1])], dim=1)


def fixed_batch_losses(config: str, steps: int, overrides: list[str], batch: int = 2, seed: int = 0) -> list[float]:
    """Build `config`'s model (with overrides, vocab 256) and train it `steps` AdamW steps on one random batch."""
    cfg = load_config(config, [*overrides, "model.vocab_size=256", "data.vocab_size=256"])
    torch.manual_seed(seed)
    model = build_arch(cfg.model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, cfg.data.seq_len + 1), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
