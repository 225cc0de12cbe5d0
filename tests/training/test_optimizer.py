"""Parameter groups honour optimizer hints; the LR multiplier warms up then decays by cosine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hybrid_pretrain.training.memory import estimate_memory
from hybrid_pretrain.training.optimizer import param_groups, warmup_cosine


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.log_dt = nn.Parameter(torch.zeros(4))
        self.log_dt._optim = {"lr": 1e-3, "weight_decay": 0.0}


def test_groups_read_hints_and_skip_decay_on_vectors():
    groups = param_groups(Tiny(), lr=3e-3, weight_decay=0.1)
    by_key = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_key == {(3e-3, 0.1): 1, (3e-3, 0.0): 3, (1e-3, 0.0): 1}
    assert sum(len(g["params"]) for g in groups) == len(list(Tiny().parameters()))


def test_hint_never_raises_the_lr():
    groups = param_groups(Tiny(), lr=1e-4, weight_decay=0.1)
    assert max(g["lr"] for g in groups) == pytest.approx(1e-4)


def test_warmup_cosine_shape():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_memory_estimate_shrinks_with_zero_stage():
    from hybrid_pretrain.models.config import ModelConfig
    from hybrid_pretrain.training.config import TrainConfig

    m = ModelConfig(d_model=768, n_heads=12, layers="HAHHHHHHAHHH", vocab_size=50257)
    totals = []
    for stage in (0, 1, 2, 3):
        mem = estimate_memory(125_000_000, m, TrainConfig(zero_stage=stage), 2048, 50257, dp_size=8, precision="bf16")
        totals.append(mem["total"])
        assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    assert totals[0] > totals[1] > totals[2] > totals[3]
