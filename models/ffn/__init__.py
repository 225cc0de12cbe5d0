"""Position-wise feed-forward layers: each maps (B, ..., D) -> (B, ..., D)."""

from hybrid_pretrain.models.ffn.mlp import MLP

__all__ = ["MLP"]
