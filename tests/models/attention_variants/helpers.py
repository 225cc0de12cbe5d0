"""Shared by the attention-variant tests: train a model on one fixed batch."""

from __future__ import annotations

from hybrid_pretrain.tests.models.one_batch import train_on_one_batch


def fixed_batch_losses(config: str, steps: int, overrides: list[str], batch: int = 2, seed: int = 0) -> list[float]:
    """`config`'s model (with overrides, vocab 256) trained `steps` AdamW steps on one random batch."""
    return train_on_one_batch(config, steps, [*overrides, "model.vocab_size=256", "data.vocab_size=256"], batch,
                              vocab=256, seed=seed)
