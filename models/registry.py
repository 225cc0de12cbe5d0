"""Name -> class tables for mixers and feed-forward layers; `models.pattern` maps pattern symbols to these names.

Adding a mixer is one import and one entry here (plus a symbol in the pattern); the block and the
model never change. Constructors take ``(cfg: ModelConfig, layer_idx: int)``.
"""

from __future__ import annotations

from torch import nn

from models.config import ConfigError, ModelConfig
from models.ffn.mlp import MLP
from models.ffn.moe import MoE
from models.mixers.attention import Attention
from models.mixers.h3 import H3
from models.mixers.s4d import S4D

MIXERS: dict[str, type[nn.Module]] = {"attention": Attention, "h3": H3, "s4d": S4D}
FFNS: dict[str, type[nn.Module]] = {"mlp": MLP, "moe": MoE}


def _build(table: dict[str, type[nn.Module]], kind: str, name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if name not in table:
        raise ConfigError(f"unknown {kind} '{name}' for layer {layer_idx}; registered: {', '.join(sorted(table))}")
    return table[name](cfg, layer_idx)


def build_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Instantiate the registered sequence mixer `name` for layer `layer_idx`."""
    return _build(MIXERS, "mixer", name, cfg, layer_idx)


def build_ffn(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Instantiate the registered feed-forward layer `name` for layer `layer_idx`."""
    return _build(FFNS, "ffn", name, cfg, layer_idx)
