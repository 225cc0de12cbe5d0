"""Hugging Face config for the project's hybrid LM: the ModelConfig fields, stored flat in config.json.

Copied next to a checkpoint by ``launcher/convert_checkpoint.py --format hf``; the model shapes stay
owned by ``models.config.ModelConfig`` (this class only carries them through transformers).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class HybridLMConfig(PretrainedConfig):
    """Every ModelConfig field as an attribute, plus transformers' own (e.g. ``tie_word_embeddings``).

    transformers' standard names read the ModelConfig fields they stand for (``hidden_size`` is
    ``d_model``, ...), and ``num_hidden_layers`` counts the layers of the ``layers`` pattern, so generic
    transformers code (generation, caches, tooling) finds the depth and widths where it looks for them.
    """

    model_type = "hybrid_lm"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, tie_embeddings: bool = True, **kwargs) -> None:
        self.tie_embeddings = tie_embeddings
        kwargs.setdefault("tie_word_embeddings", tie_embeddings)
        kwargs.pop("num_hidden_layers", None)  # derived from `layers`, never stored on its own
        super().__init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """One layer per mixer symbol of the ``layers`` pattern (``|`` only cuts pipeline stages)."""
        return len(getattr(self, "layers", "").replace("|", ""))
