"""Sequence classifier over the same hybrid stack as the language model (Long Range Arena style).

token or value embedding -> Block x n_layers (any ``cfg.layers`` pattern; bidirectional variants through
``cfg.options``) -> LayerNorm -> pooling over real positions -> linear head.

Pooling ``mean`` averages every unpadded position (the LRA setting, natural for bidirectional layers);
``last`` reads the last unpadded position, the only one that has seen the whole input in a causal stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn import build_ffn
from hybrid_pretrain.models.mixers import build_mixer
from hybrid_pretrain.models.pattern import parse_pattern

POOLINGS = ("mean", "last")


class SequenceClassifier(nn.Module):
    """``forward(inputs (B, L), mask=None, labels=None)`` -> logits (B, classes), or the mean loss with labels.

    inputs are token ids when ``cfg.vocab_size > 0`` and scalar values (one feature per position) otherwise.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        cfg.validate()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.cfg, self.pooling = cfg, pooling
        plan = parse_pattern(cfg.layers, cfg.ffn)
        # Values: a learned affine map of each scalar; tokens: a lookup table.
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model) if cfg.vocab_size else nn.Linear(1, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(build_mixer(layer.mixer, cfg, i), build_ffn(layer.ffn, cfg, i),
                  nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
                  dropout=cfg.dropout)
            for i, layer in enumerate(plan.layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, num_classes)

    def features(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs (B, L), mask (B, L) True on real positions (right padding) -> pooled features (B, D)."""
        h = self.embedding(inputs) if self.cfg.vocab_size else self.embedding(inputs.unsqueeze(-1).float())
        if mask is not None:
            h = h * mask.unsqueeze(-1)  # padding enters the mixers as zeros
        for block in self.blocks:
            h = block(h)  # (B, L, D)
        h = self.norm(h)
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if self.pooling == "last":
            last = mask.long().sum(1).clamp(min=1) - 1  # (B,) index of the last real position
            return h[torch.arange(h.shape[0], device=h.device), last]
        weights = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(
        self, inputs: torch.Tensor, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, classes), or the mean cross-entropy (fp32) when `labels` (B,) is given."""
        logits = self.head(self.features(inputs, mask))
        return logits if labels is None else F.cross_entropy(logits.float(), labels)
