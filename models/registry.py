"""Name -> class tables for mixers, feed-forward layers and whole architectures.

Entries are ``"module:Class"`` strings imported on first use, so adding a layer is one line here
(plus a symbol in `models.pattern`) and importing the registry does not import every model family.
Mixer and feed-forward constructors take ``(cfg: ModelConfig, layer_idx: int)``; architectures take
``(cfg: ModelConfig)``. Names are unique across the three tables, since `model.options` is keyed by them.
"""

from __future__ import annotations

import importlib

from torch import nn

from hybrid_pretrain.models.config import ConfigError, ModelConfig

MIXERS: dict[str, str] = {
    "attention": "hybrid_pretrain.models.mixers.attention:Attention",
    "h3": "hybrid_pretrain.models.mixers.h3:H3",
    "s4d": "hybrid_pretrain.models.mixers.s4d:S4D",
    "s4": "hybrid_pretrain.models.mixers.s4:S4",
    "dss": "hybrid_pretrain.models.mixers.dss:DSS",
    "gss": "hybrid_pretrain.models.mixers.gss:GSS",
    "s5": "hybrid_pretrain.models.mixers.s5:S5",
    "dlr": "hybrid_pretrain.models.mixers.dlr:DLR",
    "mega": "hybrid_pretrain.models.mixers.mega:Mega",
    "linear_attention": "hybrid_pretrain.models.mixers.linear_attention:LinearAttention",
    "bigbird": "hybrid_pretrain.models.mixers.bigbird:BigBird",
    "block_recurrent": "hybrid_pretrain.models.mixers.block_recurrent:BlockRecurrent",
    "sparse_attention": "hybrid_pretrain.models.mixers.sparse_attention:SparseQKVAttention",
    "butterfly_attention": "hybrid_pretrain.models.mixers.butterfly_attention:ButterflyAttention",
}
FFNS: dict[str, str] = {
    "mlp": "hybrid_pretrain.models.ffn.mlp:MLP",
    "moe": "hybrid_pretrain.models.ffn.moe:MoE",
    "sparse_ffn": "hybrid_pretrain.models.ffn.sparse_ffn:SparseFFN",
    "butterfly_mlp": "hybrid_pretrain.models.ffn.butterfly_mlp:ButterflyMLP",
}
# Whole models: each takes a ModelConfig and offers ``forward(input_ids, labels=None)`` like LanguageModel.
ARCHS: dict[str, str] = {
    "lm": "hybrid_pretrain.models.lm:LanguageModel",
    "perceiver_ar": "hybrid_pretrain.models.perceiver_ar:PerceiverAR",
    "deq": "hybrid_pretrain.models.deq:DEQLanguageModel",
    "structformer": "hybrid_pretrain.models.structformer:StructFormer",
    "atlas": "hybrid_pretrain.models.atlas.model:Atlas",
}


def resolve(table: dict[str, str], kind: str, name: str) -> type[nn.Module]:
    """The class registered as `name` in `table`, imported now; ConfigError naming the choices if unknown."""
    if name not in table:
        raise ConfigError(f"unknown {kind} '{name}'; registered: {', '.join(sorted(table))}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Instantiate the registered sequence mixer `name` for layer `layer_idx`."""
    return resolve(MIXERS, "mixer", name)(cfg, layer_idx)


def build_ffn(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Instantiate the registered feed-forward layer `name` for layer `layer_idx`."""
    return resolve(FFNS, "ffn", name)(cfg, layer_idx)


def build_arch(cfg: ModelConfig) -> nn.Module:
    """The whole model `cfg.arch` names (default ``lm``, the hybrid-stack LanguageModel)."""
    return resolve(ARCHS, "model.arch", cfg.arch)(cfg)


def registered_names() -> set[str]:
    return set(MIXERS) | set(FFNS) | set(ARCHS)
