"""Tiny model shapes shared by the model tests: small enough that every test runs in well under a second."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hybrid_pretrain.models.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def make_cfg() -> Callable[..., ModelConfig]:
    def make(**overrides) -> ModelConfig:
        fields = dict(vocab_size=64, d_model=32, n_heads=4, layers="HAH", h3_d_state=8, max_seq_len=64)
        fields.update(overrides)
        cfg = ModelConfig(**fields)
        cfg.validate()
        return cfg

    return make
