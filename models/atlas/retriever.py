"""Atlas's retriever: a Contriever-style bi-encoder (bidirectional attention blocks, mean pooling).

Built from the project's own parts (``models.block.Block``, ``models.ffn.mlp.MLP``, ``models.roles``);
only the attention is its own, because the LM's mixer is causal by contract and a retriever must let
every token see the whole passage. The query and passage towers of
``retrieval.encoder.DualEncoder`` and Atlas's retriever are both a ``BiEncoder``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.mlp import MLP
from hybrid_pretrain.models.mixers.attention import apply_rotary
from hybrid_pretrain.models.roles import column_linear, row_linear


@dataclass
class EncoderConfig:
    vocab_size: int = 0  # 0: the tokenizer's
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    max_len: int = 256  # tokens per query or passage (~100 words of prose is ~150 tokens)
    dropout: float = 0.0
    init_std: float = 0.02
    # Rotary dims per head (0: none): relative positions let a token see what stands just before it, which
    # copying ("the code of X is 8456" -> 8456) needs and learned absolute positions learn slowly.
    rotary_dim: int = 0

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"retrieval.encoder.{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"retrieval.encoder.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.rotary_dim < 0 or self.rotary_dim % 2 or self.rotary_dim > self.d_model // self.n_heads:
            raise ConfigError(f"retrieval.encoder.rotary_dim must be even, >= 0 and at most the head size "
                              f"{self.d_model // self.n_heads}, got {self.rotary_dim}")

    def model_config(self) -> ModelConfig:
        """The LM config the shared MLP is built from."""
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads, dropout=self.dropout)


class BidirectionalAttention(nn.Module):
    """Multi-head self-attention without a causal mask; padded keys are masked out."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.dropout
        self.rotary_dim = cfg.rotary_dim
        self.qkv_proj = column_linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)
        self.key_mask: torch.Tensor | None = None  # (B, L) bool, set by the encoder around each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        B, L, D = x.shape
        qkv = self.qkv_proj(x).view(B, L, self.n_heads, 3, self.head_dim)  # (B, L, H, 3, hd), head-major as Attention
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.rotary_dim:
            positions = torch.arange(L, device=x.device)
            q, k = apply_rotary(q, positions, self.rotary_dim), apply_rotary(k, positions, self.rotary_dim)
        mask = None if self.key_mask is None else self.key_mask[:, None, None, :]  # (B, 1, 1, L)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class BiEncoder(nn.Module):
    """Token ids (B, L) and mask (B, L) -> mean-pooled embeddings (B, D)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)  # learned positions: bidirectional attention is order-blind
        mcfg = cfg.model_config()
        self.blocks = nn.ModuleList(
            Block(BidirectionalAttention(cfg), MLP(mcfg, i), nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model),
                  cfg.dropout)
            for i in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) int64, mask: (B, L) bool (True = real token) -> (B, D)."""
        L = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(L, device=ids.device))  # (B, L, D)
        for block in self.blocks:
            block.mixer.key_mask = mask
            x = block(x)
            block.mixer.key_mask = None
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # mean over real tokens, (B, D)
