"""Sequence mixers: each maps (B, L, D) -> (B, L, D) and can decode recurrently via allocate_state/step.

The table below is where a mixer joins the system: one ``MIXERS.register(symbol, name, class)`` line
makes it usable in ``model.layers``, configurable under ``model.options.<name>`` and covered by the mixer
contract tests (causality, ``step`` = ``forward``, ``prefill`` = steps), which run over every entry.
"""

from __future__ import annotations

from torch import nn

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.layers.butterfly import ButterflyOptions
from hybrid_pretrain.models.mixers.attention import Attention
from hybrid_pretrain.models.mixers.bigbird import BigBird, BigBirdOptions
from hybrid_pretrain.models.mixers.block_recurrent import BlockRecurrent, BlockRecurrentOptions
from hybrid_pretrain.models.mixers.butterfly_attention import ButterflyAttention
from hybrid_pretrain.models.mixers.dlr import DLR, DLROptions
from hybrid_pretrain.models.mixers.dss import DSS, DSSOptions
from hybrid_pretrain.models.mixers.gss import GSS, GSSOptions
from hybrid_pretrain.models.mixers.h3 import H3
from hybrid_pretrain.models.mixers.linear_attention import LinearAttention, LinearAttentionOptions
from hybrid_pretrain.models.mixers.mega import Mega, MegaOptions
from hybrid_pretrain.models.mixers.s4 import S4, S4Options
from hybrid_pretrain.models.mixers.s4d import S4D, S4DOptions
from hybrid_pretrain.models.mixers.s5 import S5, S5Options
from hybrid_pretrain.models.mixers.sparse_attention import SparseQKVAttention, SparseQKVOptions
from hybrid_pretrain.models.registry import Registry

MIXERS = Registry("mixer")
MIXERS.register("attention", Attention, symbol="A")
MIXERS.register("h3", H3, symbol="H")
MIXERS.register("s4d", S4D, symbol="S", options=S4DOptions)
MIXERS.register("s4", S4, symbol="4", options=S4Options)
MIXERS.register("dss", DSS, symbol="d", options=DSSOptions)
MIXERS.register("gss", GSS, symbol="g", options=GSSOptions)
MIXERS.register("s5", S5, symbol="5", options=S5Options)
MIXERS.register("dlr", DLR, symbol="r", options=DLROptions)
MIXERS.register("mega", Mega, symbol="M", options=MegaOptions)
MIXERS.register("linear_attention", LinearAttention, symbol="L", options=LinearAttentionOptions)
MIXERS.register("bigbird", BigBird, symbol="B", options=BigBirdOptions)
MIXERS.register("block_recurrent", BlockRecurrent, symbol="R", options=BlockRecurrentOptions)
# Scaling Transformer's sparse QKV; Pixelated Butterfly projections.
MIXERS.register("sparse_attention", SparseQKVAttention, symbol="Q", options=SparseQKVOptions)
MIXERS.register("butterfly_attention", ButterflyAttention, symbol="P", options=ButterflyOptions)


def build_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Instantiate the registered sequence mixer ``name`` for layer ``layer_idx``."""
    return MIXERS.get(name)(cfg, layer_idx)
