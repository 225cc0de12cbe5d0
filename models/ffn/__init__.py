"""Position-wise feed-forward layers: each maps (B, ..., D) -> (B, ..., D).

One ``FFNS.register(symbol, name, class)`` line per layer makes it usable in ``model.ffn`` and
configurable under ``model.options.<name>``.
"""

from __future__ import annotations

from torch import nn

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.butterfly_mlp import ButterflyMLP
from hybrid_pretrain.models.ffn.mlp import MLP
from hybrid_pretrain.models.ffn.moe import MoE
from hybrid_pretrain.models.ffn.sparse_ffn import SparseFFN, SparseFFNOptions
from hybrid_pretrain.models.layers.butterfly import ButterflyOptions
from hybrid_pretrain.models.registry import Registry

FFNS = Registry("ffn")
FFNS.register("mlp", MLP, symbol="D")
FFNS.register("moe", MoE, symbol="E")
# Scaling Transformer's controller-selected sparse feed-forward; Pixelated Butterfly weights.
FFNS.register("sparse_ffn", SparseFFN, symbol="S", options=SparseFFNOptions)
FFNS.register("butterfly_mlp", ButterflyMLP, symbol="P", options=ButterflyOptions)


def build_ffn(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Instantiate the registered feed-forward layer ``name`` for layer ``layer_idx``."""
    return FFNS.get(name)(cfg, layer_idx)
