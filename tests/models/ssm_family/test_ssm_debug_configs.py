"""Each SSM-family debug config's model learns: 30 AdamW steps on one fixed batch lower the loss.

The vocabulary is cut to 512 (the tokenizer's size is a data choice, not the mixer's) to keep this quick.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.optimizer import param_groups

VOCAB = 512


@pytest.mark.slow
@pytest.mark.parametrize("name", ["s4", "s4d", "dss", "gss"])
def test_debug_config_model_trains(name: str) -> None:
    cfg = load_config(f"configs/debug_{name}.yaml")
    assert cfg.model.layers.replace("|", "") and set(cfg.model.options) <= {name}
    torch.manual_seed(0)
    model = build_arch(dataclasses.replace(cfg.model, vocab_size=VOCAB))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.lr, 0.1), lr=cfg.train.lr)
    ids = torch.randint(0, VOCAB, (4, 33))
    losses = []
    for _ in range(30):
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
