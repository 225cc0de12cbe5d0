"""Train a config's model on one fixed random batch: the "it learns" check every architecture's tests share."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.training.config import load_config


def train_on_one_batch(config: str, steps: int, overrides: Sequence[str], batch: int, vocab: int, lr: float = 3e-3,
                       seed: int = 0) -> list[float]:
    """Build `config`'s model (with `overrides`, which must set a vocabulary <= `vocab`) and take `steps` AdamW
    steps on one batch of random token ids; returns the loss of every step."""
    cfg = load_config(config, list(overrides))
    torch.manual_seed(seed)
    model = build_arch(cfg.model)
    ids = torch.randint(0, vocab, (batch, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
