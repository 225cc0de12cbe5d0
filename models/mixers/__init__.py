"""Sequence mixers: each maps (B, L, D) -> (B, L, D) and can decode recurrently via allocate_state/step."""

from hybrid_pretrain.models.mixers.attention import Attention
from hybrid_pretrain.models.mixers.h3 import H3

__all__ = ["Attention", "H3"]
