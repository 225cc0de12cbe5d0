"""Fusion-in-Decoder reader (Izacard & Grave 2021) built from the project's blocks.

Each retrieved passage is encoded together with the query, independently of the others (cost linear in
the number of passages); the decoder then attends over all K encodings at once, which is where the
evidence is fused. The decoder is the hybrid stack of ``model.layers`` (H3, attention, ...), each layer
followed by a cross-attention over the encoder states, so Atlas reuses whatever mixer the LM uses.

The cross-attention also reports how much attention each passage received, the signal of Atlas's
attention-distillation loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.models.atlas.retriever import BidirectionalAttention, EncoderConfig
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn import build_ffn
from hybrid_pretrain.models.ffn.mlp import MLP
from hybrid_pretrain.models.mixers import build_mixer
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.models.roles import column_linear, row_linear


def in_query_flags(ids: torch.Tensor, mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """ids, mask (N, C) of query-then-passage contexts -> (N, C) bool: a passage token whose id occurs among the
    first `query_len` (real) tokens. Query positions and padding are never flagged."""
    query = ids[:, None, :query_len].masked_fill(~mask[:, None, :query_len], -1)  # (N, 1, Lq), padding matches none
    flags = (ids[:, :, None] == query).any(-1) & mask  # (N, C)
    flags[:, :query_len] = False
    return flags


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the encoder memory; explicit softmax so the weights can be read."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = column_linear(d_model, d_model)
        self.kv_proj = column_linear(d_model, 2 * d_model)
        self.out_proj = row_linear(d_model, d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                passage_of_key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D), memory (B, M, D), memory_mask (B, M) bool (True = real token).

        Returns (y (B, T, D), attention score per passage (B, K) or None): for each passage, the
        attention probability on its tokens times the norm of their values, summed over heads and
        decoder positions (Atlas's aggregation for attention distillation). `passage_of_key` (M,)
        gives each memory position's passage index.
        """
        B, T, D = x.shape
        M = memory.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        kv = self.kv_proj(memory).view(B, M, self.n_heads, 2, self.head_dim)  # (B, M, H, 2, hd)
        k, v = kv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, H, M, hd)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, M)
        logits = logits.masked_fill(~memory_mask[:, None, None, :], float("-inf"))
        probs = F.softmax(logits.float(), dim=-1).to(q.dtype)  # (B, H, T, M)
        y = (probs @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        per_passage = None
        if passage_of_key is not None:
            weight = probs.detach() * v.detach().norm(dim=-1).unsqueeze(2)  # (B, H, T, M)
            per_key = weight.sum(dim=(1, 2))  # (B, M)
            K = int(passage_of_key.max()) + 1
            per_passage = per_key.new_zeros(B, K).index_add_(1, passage_of_key, per_key)  # (B, K)
        return self.out_proj(y), per_passage


class DecoderLayer(nn.Module):
    """Pre-norm: ``x + mixer(norm(x))``, ``+ cross_attention(norm(x), memory)``, ``+ ffn(norm(x))``."""

    def __init__(self, block: Block, cross: CrossAttention, d_model: int, eps: float) -> None:
        super().__init__()
        self.block, self.cross = block, cross
        self.norm_cross = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                passage_of_key: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.block
        x = x + b.drop(b.mixer(b.norm1(x)))
        y, per_passage = self.cross(self.norm_cross(x), memory, memory_mask, passage_of_key)
        x = x + b.drop(y)
        return x + b.drop(b.ffn(b.norm2(x))), per_passage


class FiDReader(nn.Module):
    """``forward(context_ids (B, K, C), context_mask (B, K, C), target_ids (B, T))`` -> logits (B, T, V).

    `context_ids` holds query + passage tokens per retrieved passage. The embedding is shared by the
    encoder, the decoder and the (tied) output head.
    """

    def __init__(self, cfg: ModelConfig, encoder_layers: int, match_query_len: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.context_pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)  # the encoder is order-blind otherwise
        # match_query_len > 0: the first match_query_len context tokens are the query, and each passage token
        # gets a learned "also in the query" vector (DrQA's exact-match feature, Chen et al. 2017). A zero-initialised
        # parameter, not an nn.Embedding: the model's init draws nothing for it, so every other initial weight is
        # the one the model has without it.
        self.match_query_len = match_query_len
        self.in_query = nn.Parameter(torch.zeros(2, cfg.d_model)) if match_query_len else None  # (not, in) query
        enc_cfg = EncoderConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                n_layers=encoder_layers, max_len=cfg.max_seq_len, dropout=cfg.dropout,
                                rotary_dim=cfg.rotary_dim)
        self.encoder = nn.ModuleList(
            Block(BidirectionalAttention(enc_cfg), MLP(cfg, i), nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
                  nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), cfg.dropout)
            for i in range(encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        plan = parse_pattern(cfg.layers, cfg.ffn)
        self.decoder = nn.ModuleList(
            DecoderLayer(
                Block(build_mixer(layer.mixer, cfg, i), build_ffn(layer.ffn, cfg, i),
                      nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
                      cfg.dropout),
                CrossAttention(cfg.d_model, cfg.n_heads), cfg.d_model, cfg.norm_eps,
            )
            for i, layer in enumerate(plan.layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def encode(self, context_ids: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """(B, K, C) ids and mask -> encoder states (B, K*C, D), each passage encoded on its own."""
        B, K, C = context_ids.shape
        ids, mask = context_ids.reshape(B * K, C), context_mask.reshape(B * K, C)
        h = self.embedding(ids) + self.context_pos(torch.arange(C, device=ids.device))  # (B*K, C, D)
        if self.in_query is not None:
            h = h + self.in_query[in_query_flags(ids, mask, self.match_query_len).long()]  # (B*K, C, D)
        for block in self.encoder:
            block.mixer.key_mask = mask
            h = block(h)
            block.mixer.key_mask = None
        return self.encoder_norm(h).reshape(B, K * C, -1)  # (B, K*C, D)

    def forward(self, context_ids: torch.Tensor, context_mask: torch.Tensor, target_ids: torch.Tensor,
                passage_scores: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits (B, T, V), per-passage attention score (B, K) summed over layers, or None)."""
        B, K, C = context_ids.shape
        memory = self.encode(context_ids, context_mask)  # (B, K*C, D)
        memory_mask = context_mask.reshape(B, K * C)
        passage_of_key = torch.arange(K, device=memory.device).repeat_interleave(C) if passage_scores else None
        x = self.embedding(target_ids)  # (B, T, D)
        total = None
        for layer in self.decoder:
            x, per_passage = layer(x, memory, memory_mask, passage_of_key)
            if per_passage is not None:
                total = per_passage if total is None else total + per_passage
        logits = F.linear(self.norm(x), self.embedding.weight)  # (B, T, V), tied head
        return logits, total
