"""Hugging Face ``AutoModelForCausalLM`` for the project's hybrid H3/attention/MoE LM.

Choice: this file imports the project's ``models.lm.LanguageModel`` instead of duplicating it, so the
package must be installed where the checkpoint is loaded (``pip install -e .`` of this repository,
or the wheel). One implementation means the HF model cannot drift from the trained one.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.roles import IGNORE_INDEX

from .configuration_hybrid_lm import HybridLMConfig


def model_config(config: HybridLMConfig) -> ModelConfig:
    """The project's ModelConfig from the HF config's attributes of the same names."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{name: getattr(config, name) for name in fields if hasattr(config, name)})


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    """Wraps LanguageModel as ``self.model``; weights are stored as ``model.<LanguageModel key>``."""

    config_class = HybridLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: HybridLMConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(model_config(config))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; a fresh model keeps LanguageModel's own GPT-2 init."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """input_ids (B, L) -> logits (B, L, V); `labels` follow HF (unshifted, -100 ignored), so shifted here.

        `attention_mask` is accepted for API compatibility but only right padding is meaningful: the
        model is causal, so padded positions after the real tokens do not change earlier logits.
        """
        logits = self.model(input_ids)  # (B, L, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutput(loss=loss, logits=logits)
