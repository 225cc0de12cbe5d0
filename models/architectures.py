"""Whole models by name (``model.arch``), and the checks on a ModelConfig that need every registry.

Each architecture takes a ModelConfig and offers ``forward(input_ids, labels=None)`` like
``LanguageModel``; ``ARCHS.register(name, class)`` adds one. ``validate_model`` is the full check of a
model config: its own fields, the layer pattern against the registered mixer and feed-forward symbols,
and every ``model.options.<name>`` section against the options dataclass ``name`` registered.
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.atlas.model import Atlas, AtlasOptions
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.deq import DEQLanguageModel, DEQOptions
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.models.perceiver_ar import PerceiverAR, PerceiverAROptions
from hybrid_pretrain.models.registry import Registry, options_class, registered_names
from hybrid_pretrain.models.structformer import StructFormer, StructFormerOptions

ARCHS = Registry("model.arch")
ARCHS.register("lm", LanguageModel)
ARCHS.register("perceiver_ar", PerceiverAR, options=PerceiverAROptions)
ARCHS.register("deq", DEQLanguageModel, options=DEQOptions)
ARCHS.register("structformer", StructFormer, options=StructFormerOptions)
ARCHS.register("atlas", Atlas, options=AtlasOptions)


def validate_model(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first problem of ``cfg``: fields, layer pattern, arch or option names."""
    cfg.validate()
    parse_pattern(cfg.layers, cfg.ffn)
    if cfg.arch not in ARCHS:
        choices = ", ".join(sorted(ARCHS.names()))
        raise ConfigError(f"model.arch '{cfg.arch}' is not registered; expected one of {choices}")
    known = registered_names()
    for name in cfg.options:
        if name not in known:
            raise ConfigError(f"model.options.{name}: no mixer, ffn or arch is registered as '{name}'; "
                              f"expected one of {', '.join(sorted(known))}")
        options = options_class(name)
        if options is None:
            raise ConfigError(f"model.options.{name}: '{name}' takes no options; expected no model.options.{name}")
        layer_options(cfg, name, options)  # types and ranges, as the layer itself will read them


def build_arch(cfg: ModelConfig) -> nn.Module:
    """The whole model ``cfg.arch`` names (default ``lm``, the hybrid-stack LanguageModel)."""
    return ARCHS.get(cfg.arch)(cfg)


def count_parameters(cfg: ModelConfig) -> int:
    """Number of distinct parameters (tied weights once), counted on the meta device without allocating.

    Building draws an init seed from the global generator; counting must not move it (a resumed run restores
    that generator and every later dropout mask depends on it), so the build runs on a forked RNG state.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_arch(cfg)
    return sum(p.numel() for p in model.parameters())
