"""Dense GELU MLP, the feed-forward half of every GPT-2-style block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.roles import column_linear, row_linear


class MLP(nn.Module):
    """d_model -> ffn_dim -> d_model with GELU (tanh approximation, as GPT-2 and the H3 reference).

    Under tensor parallelism each rank holds ``ffn_dim / TP`` hidden units (column then row split).
    """

    supports_tensor_parallel = True

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.up_proj = column_linear(cfg.d_model, cfg.ffn_dim)
        self.down_proj = row_linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D); position-wise, so it also serves the one-token decoding step."""
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
