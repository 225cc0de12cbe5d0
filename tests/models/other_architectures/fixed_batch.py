"""Shared by the other-architecture tests: train a config's model (shrunk) on one fixed batch."""

from __future__ import annotations

import torch

from launcher.config import load_config
from models.registry import build_arch

SMALL = ["model.d_model=64", "model.n_heads=4", "data.seq_len=32", "model.vocab_size=128", "data.vocab_size=128"]


def fixed_batch_losses(config: str, steps: int = 25, overrides: tuple[str, ...] = (), lr: float = 3e-3) -> list[float]:
    """Build `config`'s model with the SMALL shape (plus `overrides`) and take `steps` AdamW steps on one batch."""
    cfg = load_config(config, [*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_arch(cfg.model)
    ids = torch.randint(0, 128, (4, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
