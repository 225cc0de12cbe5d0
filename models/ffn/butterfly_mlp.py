"""MLP with Pixelated Butterfly weights (Dao et al. 2022): the dense MLP's two projections made flat
block-butterfly + low-rank (see `models.layers.butterfly`); options in ``model.options.butterfly_mlp``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.layers.butterfly import ButterflyOptions
from hybrid_pretrain.models.options import layer_options


class ButterflyMLP(nn.Module):
    """d_model -> ffn_dim -> d_model with GELU, as `models.ffn.mlp.MLP`, through ButterflyLinear weights."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        opts = layer_options(cfg, "butterfly_mlp", ButterflyOptions)
        self.up_proj = opts.linear(cfg.d_model, cfg.ffn_dim, cfg.init_std, "butterfly_mlp")
        self.down_proj = opts.linear(cfg.ffn_dim, cfg.d_model, cfg.init_std, "butterfly_mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D); position-wise, so it also serves the decoding step."""
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
