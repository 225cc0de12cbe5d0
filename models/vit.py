"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

image (B, C, H, W) -> non-overlapping p x p patches, each linearly embedded (a stride-p convolution)
-> [class token; patches] + learned positions -> Block x n_layers (models.block.Block: pre-norm,
bidirectional self-attention, the project's MLP) -> LayerNorm -> linear head on the class token.

models.mixers.attention is causal by contract (it decodes), so the encoder's attention lives here and
calls the same functional op, ``kernels.attention``, with ``causal=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.kernels.attention import attention
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn import build_ffn
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.models.roles import column_linear, row_linear


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention: ``forward(x (B, N, D)) -> (B, N, D)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv_proj = column_linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, N, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # (B, H, N, hd)
        y = attention(q, k, v, causal=False, dropout_p=self.dropout if self.training else 0.0)  # (B, H, N, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, self.d_model))


class ViT(nn.Module):
    """``forward(images (B, C, H, W), labels=None)`` -> logits (B, classes), or the mean loss with labels.

    ``cfg.layers`` gives the depth and must be all ``A`` (every ViT layer is attention); ``cfg.ffn`` as usual.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, patch_size: int, channels: int, num_classes: int) -> None:
        super().__init__()
        cfg.validate()
        if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
            raise ConfigError(f"patch_size ({patch_size}) must be positive and divide image_size ({image_size})")
        plan = parse_pattern(cfg.layers, cfg.ffn)
        if any(layer.mixer != "attention" for layer in plan.layers):
            raise ConfigError(f"ViT layers must all be 'A' (attention), got '{cfg.layers}'")
        self.cfg, self.image_size, self.patch_size, self.channels = cfg, image_size, patch_size, channels
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(channels, cfg.d_model, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches + 1, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(SelfAttention(cfg), build_ffn(layer.ffn, cfg, i), nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
                  nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), dropout=cfg.dropout)
            for i, layer in enumerate(plan.layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, num_classes)
        nn.init.normal_(self.pos_embed, std=cfg.init_std)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> patch embeddings (B, N, D), patches in row-major order."""
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"ViT expects images (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        return self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        patches = self.patchify(images)  # (B, N, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # (B, 1, D)
        h = self.drop(torch.cat([cls, patches], dim=1) + self.pos_embed)  # (B, N + 1, D)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm(h[:, 0]))  # the class token's features
        return logits if labels is None else F.cross_entropy(logits.float(), labels)
