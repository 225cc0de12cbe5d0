"""Perceiver AR (Hawthorne et al. 2022, "General-purpose, long-context autoregressive modeling with Perceiver AR").

    token embedding (B, L, D)
      -> the last N positions become latents; each latent cross-attends to ALL L inputs, causally
         (latent i, at position L-N+i, sees inputs 0 .. L-N+i), then an MLP
      -> Block x n_layers over the N latents (the `model.layers` pattern, e.g. "AAAA": causal self-attention)
      -> LayerNorm -> LM head: logits for the N latent positions only

The long context is read once, by one cross-attention of cost O(N L); the deep stack costs O(N²) per
layer instead of O(L²). Only the latent positions predict, so the loss is taken on their targets only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn import build_ffn
from hybrid_pretrain.models.init import GPT2Init, draw_init_seed
from hybrid_pretrain.models.mixers import build_mixer
from hybrid_pretrain.models.mixers.attention import apply_rotary
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.models.roles import IGNORE_INDEX, column_linear, row_linear


@dataclass
class PerceiverAROptions:
    """``model.options.perceiver_ar``."""

    num_latents: int = 64  # N: the last N positions are latents (all positions when L <= N)

    def validate(self, name: str) -> None:
        if self.num_latents <= 0:
            raise ConfigError(f"model.options.{name}.num_latents must be a positive integer, got {self.num_latents}")


class CausalCrossAttention(nn.Module):
    """Latent queries (the last N positions) attend to all L positions, each up to its own position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rotary_dim = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.rotary_dim
        self.q_proj = column_linear(cfg.d_model, cfg.d_model)
        self.kv_proj = column_linear(cfg.d_model, 2 * cfg.d_model)
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """latents: (B, N, D) at positions L-N .. L-1; inputs: (B, L, D) -> (B, N, D)."""
        B, N, _ = latents.shape
        L = inputs.shape[1]
        positions = torch.arange(L, device=inputs.device)
        q = self.q_proj(latents).view(B, N, -1, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        kv = self.kv_proj(inputs).view(B, L, -1, 2, self.head_dim)  # (B, L, H, 2, hd)
        k, v = kv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.rotary_dim:
            q, k = apply_rotary(q, positions[L - N :], self.rotary_dim), apply_rotary(k, positions, self.rotary_dim)
        # Bottom-right aligned causal mask; kernels.attention's causal flag is top-left aligned, so SDPA with
        # an explicit mask here. Latent i sees keys j <= L-N+i.
        visible = torch.ones(N, L, dtype=torch.bool, device=inputs.device).tril(diagonal=L - N)  # (N, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, H, N, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, -1))  # (B, N, D)


class PerceiverAR(nn.Module):
    """Perceiver AR: ``forward(input_ids (B, L), labels=None)`` -> logits (B, N, V) or the latent-position loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be set (> 0) to build PerceiverAR, got {cfg.vocab_size}")
        init_seed = draw_init_seed()  # before any submodule draws from the global generator
        self.cfg = cfg
        self.opts = layer_options(cfg, "perceiver_ar", PerceiverAROptions)
        plan = parse_pattern(cfg.layers, cfg.ffn)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.input_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.latent_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross = CausalCrossAttention(cfg)
        self.cross_mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross_mlp = build_ffn("mlp", cfg, 0)
        self.blocks = nn.ModuleList(
            Block(
                build_mixer(layer.mixer, cfg, i + 1),
                build_ffn(layer.ffn, cfg, i + 1),
                nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
                nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
                dropout=cfg.dropout,
            )
            for i, layer in enumerate(plan.layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else column_linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.weight_init = GPT2Init(init_seed, cfg.init_std, residual_layers=len(self.blocks) + 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init as LanguageModel's; the cross-attention layer counts as one more residual layer."""
        self.weight_init(self)

    def num_latents(self, length: int) -> int:
        """Latents used for a sequence of `length` tokens."""
        return min(self.opts.num_latents, length)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, L) -> logits (B, N, V) for positions L-N .. L-1 when `labels` is None.

        With `labels` (B, L) (labels[:, t] follows input_ids[:, t]) returns the mean fp32 cross-entropy
        over the latent positions' labels that are not -100; labels of earlier positions are ignored.
        """
        L = input_ids.shape[1]
        N = self.num_latents(L)
        h = self.drop(self.embedding(input_ids))  # (B, L, D)
        latents = h[:, L - N :]  # (B, N, D): each latent starts as its own position's embedding
        latents = latents + self.drop(self.cross(self.latent_norm(latents), self.input_norm(h)))
        latents = latents + self.drop(self.cross_mlp(self.cross_mlp_norm(latents)))
        for block in self.blocks:
            latents = block(latents)  # (B, N, D), causal among latents
        z = self.norm(latents)
        logits = F.linear(z, self.embedding.weight) if self.lm_head is None else self.lm_head(z)  # (B, N, V)
        if labels is None:
            return logits
        targets = labels[:, L - N :]  # (B, N)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
