"""Sparse QKV attention of the Scaling Transformer, "Sparse is Enough in Scaling Transformers" (Jaszczur et al. 2021).

Q, K and V come from a multiplicative dense layer followed by a 2-D convolution (the paper's full
variant, not the simpler multiplicative-only one):
    mult[s, m] = sum_i x_i D[i, s] E[i, m]          D: (d, S), E: (d, M), d = S * M; shared by Q, K, V
    Q, K, V    = Conv2d_{q,k,v}(mult)                M filters, F x F kernel over (length, modules);
                                                     causal in length (each output sees the last F tokens)

The multiplicative layer holds d (S + M) weights instead of d^2 and can still route any input to any
module; the convolution mixes F neighbouring modules of the last F tokens. Attention itself and the
output projection are the usual ones. Recurrent decoding keeps the KV cache plus the last F - 1
multiplicative outputs for the convolution. Options: ``model.options.sparse_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.kernels.attention import attention
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.attention import apply_rotary
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.roles import row_linear


@dataclass
class SparseQKVOptions:
    modules: int = 16  # S: modules of the multiplicative layer; M = d_model / S filters per module
    kernel: int = 3  # F: convolution kernel over (length, modules), odd

    def validate(self, name: str) -> None:
        if self.modules <= 0:
            raise ConfigError(f"model.options.{name}.modules must be a positive integer, got {self.modules}")
        if self.kernel <= 0 or self.kernel % 2 == 0:
            raise ConfigError(f"model.options.{name}.kernel must be a positive odd integer, got {self.kernel}")


class SparseQKVAttention(nn.Module):
    """Causal attention with multiplicative + convolutional Q/K/V: ``forward(x (B, L, D)) -> (B, L, D)``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        opts = layer_options(cfg, "sparse_attention", SparseQKVOptions)
        if cfg.d_model % opts.modules:
            raise ConfigError(f"model.options.sparse_attention.modules ({opts.modules}) must divide model.d_model "
                              f"({cfg.d_model})")
        self.layer_idx = layer_idx
        self.d_model, self.n_heads = cfg.d_model, cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rotary_dim, self.dropout = cfg.rotary_dim, cfg.dropout
        self.modules_, self.filters, self.kernel = opts.modules, cfg.d_model // opts.modules, opts.kernel
        self.mult_d = nn.Parameter(torch.empty(cfg.d_model, self.modules_))  # D: (d, S)
        self.mult_e = nn.Parameter(torch.empty(cfg.d_model, self.filters))  # E: (d, M)
        # Padding only along modules; the length axis is padded on the left by hand, for causality.
        self.convs = nn.ModuleList(
            nn.Conv2d(self.filters, self.filters, opts.kernel, padding=(0, opts.kernel // 2)) for _ in range(3)
        )
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """D ~ N(0, 1), E ~ N(0, 1/d): each multiplicative output has unit variance for unit-variance x."""
        with torch.no_grad():
            nn.init.normal_(self.mult_d)
            nn.init.normal_(self.mult_e, std=1.0 / math.sqrt(self.d_model))

    def _multiplicative(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d) -> (..., M, S): sum_i x_i D[i, s] E[i, m], laid out as Conv2d channels first."""
        return torch.einsum("...i,is,im->...ms", x, self.mult_d, self.mult_e)

    def _heads(self, conv_out: torch.Tensor) -> torch.Tensor:
        """(B, M, L, S) -> (B, H, L, hd), feature index s * M + m."""
        B, _, L, _ = conv_out.shape
        return conv_out.permute(0, 2, 3, 1).reshape(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def _qkv(self, window: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """window: (B, M, F - 1 + L, S) left-padded multiplicative outputs -> q, k, v each (B, H, L, hd)."""
        q, k, v = (self._heads(conv(window)) for conv in self.convs)
        if self.rotary_dim:
            q, k = apply_rotary(q, positions, self.rotary_dim), apply_rotary(k, positions, self.rotary_dim)
        return [q, k, v]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        B, L, _ = x.shape
        m = self._multiplicative(x).permute(0, 2, 1, 3)  # (B, M, L, S)
        m = F.pad(m, (0, 0, self.kernel - 1, 0))  # (B, M, F - 1 + L, S): token t sees tokens t-F+1..t
        q, k, v = self._qkv(m, torch.arange(L, device=x.device))
        y = attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)  # (B, H, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, self.d_model))

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """KV cache (B, H, max_len, hd), the last F - 1 multiplicative outputs (B, M, F - 1, S), position."""
        kwargs = {"device": device or self.mult_d.device, "dtype": dtype or self.mult_d.dtype}
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        conv = torch.zeros(batch_size, self.filters, self.kernel - 1, self.modules_, **kwargs)
        return {"k": torch.zeros(shape, **kwargs), "v": torch.zeros(shape, **kwargs), "conv": conv, "pos": 0}

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D), one position of ``forward``; updates `state`."""
        pos = state["pos"]
        if pos >= state["k"].shape[2]:
            raise RuntimeError(f"sparse attention KV cache is full ({pos} positions); allocate a larger max_len")
        window = torch.cat([state["conv"], self._multiplicative(x_t).unsqueeze(2)], dim=2)  # (B, M, F, S)
        state["conv"] = window[:, :, 1:]
        q, k, v = self._qkv(window, torch.tensor([pos], device=x_t.device))  # each (B, H, 1, hd)
        state["k"][:, :, pos : pos + 1] = k
        state["v"][:, :, pos : pos + 1] = v
        state["pos"] = pos + 1
        y = F.scaled_dot_product_attention(q, state["k"][:, :, : pos + 1], state["v"][:, :, : pos + 1])
        return self.out_proj(y.reshape(x_t.shape[0], self.d_model))  # (B, D)
