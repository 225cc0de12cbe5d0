"""Shared by the other-architecture tests: train a config's model (shrunk) on one fixed batch."""

from __future__ import annotations

from hybrid_pretrain.tests.models.one_batch import train_on_one_batch

SMALL = ["model.d_model=64", "model.n_heads=4", "data.seq_len=32", "model.vocab_size=128", "data.vocab_size=128"]


def fixed_batch_losses(config: str, steps: int = 25, overrides: tuple[str, ...] = (), lr: float = 3e-3) -> list[float]:
    """`config`'s model with the SMALL shape (plus `overrides`) after `steps` AdamW steps on one batch."""
    return train_on_one_batch(config, steps, [*SMALL, *overrides], batch=4, vocab=128, lr=lr)
