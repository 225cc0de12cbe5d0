"""Hugging Face config for the project's hybrid LM: the ModelConfig fields, stored flat in config.json.

Copied next to a checkpoint by ``launcher/convert_checkpoint.py --format hf``; the model shapes stay
owned by ``models.config.ModelConfig`` (this class only carries them through transformers).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class HybridLMConfig(PretrainedConfig):
    """Every ModelConfig field as an attribute, plus transformers' own (e.g. ``tie_word_embeddings``)."""

    model_type = "hybrid_lm"

    def __init__(self, tie_embeddings: bool = True, **kwargs) -> None:
        self.tie_embeddings = tie_embeddings
        kwargs.setdefault("tie_word_embeddings", tie_embeddings)
        super().__init__(**kwargs)
