"""Causal attention whose q/k/v and output projections are Pixelated Butterfly weights (Dao et al. 2022).

Everything but the projections is `models.mixers.attention.Attention` (rotary, SDPA / Triton kernel,
KV-cache decoding); options in ``model.options.butterfly_attention``.
"""

from __future__ import annotations

import torch

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.layers.butterfly import ButterflyOptions
from hybrid_pretrain.models.mixers.attention import Attention
from hybrid_pretrain.models.options import layer_options


class ButterflyAttention(Attention):
    """Attention with ``qkv_proj`` (D -> 3D) and ``out_proj`` (D -> D) as ButterflyLinear."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        opts = layer_options(cfg, "butterfly_attention", ButterflyOptions)
        # 3D output: the pattern folds 3 square D x D butterflies' worth of blocks onto the input side.
        self.qkv_proj = opts.linear(self.d_model, 3 * self.d_model, cfg.init_std, "butterfly_attention")
        self.out_proj = opts.linear(self.d_model, self.d_model, cfg.init_std, "butterfly_attention")

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """KV cache as Attention's, placed like the butterfly weights (there is no dense ``weight``)."""
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        kwargs = {"device": device or self.qkv_proj.blocks.device, "dtype": dtype or self.qkv_proj.blocks.dtype}
        return {"k": torch.zeros(shape, **kwargs), "v": torch.zeros(shape, **kwargs), "pos": 0}
