"""GPT-2 initialisation, shared by every whole-model class (LanguageModel, Atlas, Perceiver AR, DEQ, StructFormer)."""

from __future__ import annotations

import math

import torch
from torch import nn

RESIDUAL_OUT_PROJECTIONS = ("out_proj.weight", "down_proj.weight")  # weights that write into the residual stream


def gpt2_init(model: nn.Module, std: float, residual_layers: int = 0) -> None:
    """Projections and embeddings ~ N(0, std), biases 0, residual outputs ~ N(0, std / sqrt(2 residual_layers)).

    Submodules (norms, SSMs) first apply their own ``reset_parameters``; projections are then
    overwritten. Each layer adds two branches to the residual stream, so scaling their output
    projections by 1/sqrt(2 n_layers) keeps its variance O(1) with depth (0: no scaling). Also how a
    model built on the meta device is materialised: ``to_empty(device=...)`` then this.
    """
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if residual_layers:
            residual_std = std / math.sqrt(2 * residual_layers)
            for name, p in model.named_parameters():
                if name.endswith(RESIDUAL_OUT_PROJECTIONS):
                    nn.init.normal_(p, std=residual_std)
