"""StructFormer (Shen et al. 2021): attention constrained by a dependency structure the model induces itself.

A parser (causal convolutions over the token embeddings) predicts for every token a height τ_i and
for every gap a syntactic distance δ_i (between token i and i + 1). Token i's smallest constituent
extends across gap k while δ_k < τ_i, softly:  γ[i, k] = sigmoid(s_d (τ_i - δ_k)), left and right
survival = cumulative minimum of γ (as the reference code), boundary distributions p_left(a | i),
p_right(b | i) = differences of survival. The head of a span [a, b] is softmax(s_h τ) over the span;
the parent distribution of i is

    parent[i, h] = sum_{a, b} p_left(a | i) p_right(b | i) head([a, b])_h,   h != i
    child = parentᵀ

Each attention head h of layer l uses  A = sigmoid(q kᵀ / sqrt(d)) ⊙ (w_parent parent + w_child child),
w = softmax of learned per-(layer, head) relation logits (the paper's dependency-constrained attention).

Causal version for language modelling: row i of the mask is the parse of the prefix x_0..x_i, i.e. the
sequence ends at i. Then i's constituent has its right boundary at i, so
parent_c[i, h] = sum_a p_left(a | i) head([a, i])_h, and token j < i is i's child with probability
child_c[i, j] = S_j(i) sum_a p_left(a | j) head([a, i])_i, S_j(i) the survival of j's constituent up to i.
The parser sees only the prefix (causal convolutions; δ_i is predicted from x_<=i), so row i depends on
x_<=i alone and puts no mass on keys after i. The reference code's global distance calibration (a max
over the whole batch) is left out because it would leak the future. Options: ``model.options.structformer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn import build_ffn
from hybrid_pretrain.models.init import GPT2Init, draw_init_seed
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.models.roles import IGNORE_INDEX, column_linear, row_linear

NEG = -1e9


@dataclass
class StructFormerOptions:
    parser_layers: int = 2  # causal conv + LayerNorm + tanh layers of the parser
    conv_size: int = 9  # parser convolution width (tokens back, including the current one)

    def validate(self, name: str) -> None:
        for key in ("parser_layers", "conv_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.options.{name}.{key} must be a positive integer, got {getattr(self, key)}")


def span_heads(height: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """height (B, L) -> head (B, L_a, L_b, L_h): softmax over h in [a, b] of scale * height_h (0 elsewhere)."""
    L = height.shape[-1]
    idx = torch.arange(L, device=height.device)
    inside = (idx[:, None, None] <= idx[None, None, :]) & (idx[None, None, :] <= idx[None, :, None])  # (a, b, h)
    logits = (height * scale)[:, None, None, :].masked_fill(~inside, NEG)  # (B, a, b, h)
    return torch.softmax(logits, dim=-1) * inside  # empty spans (a > b) give 0, not uniform


def boundaries(distance: torch.Tensor, height: torch.Tensor, scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """distance, height (B, L) -> p_left (B, L_i, L_a), right survival S (B, L_i, L_b), p_right (B, L_i, L_b).

    S[i, b] = P(i's constituent extends to at least b) (1 for b <= i); p_right treats the sequence end as
    a boundary. p_left[i, a] = P(i's constituent starts at a), a <= i.
    """
    gamma = torch.sigmoid((height[:, :, None] - distance[:, None, :]) * scale)  # (B, i, k): i crosses gap k
    ones = torch.ones_like(gamma)
    left = torch.where(ones.tril(-1).bool(), gamma, ones)  # gaps k < i
    left = left.flip(-1).cummin(-1)[0].flip(-1)  # (B, i, a): min over gaps a..i-1 (1 for a >= i)
    p_left = (left - F.pad(left[..., :-1], (1, 0))).tril()  # (B, i, a)
    right = torch.where(ones.triu().bool(), gamma, ones)  # gaps k >= i
    survival = F.pad(right[..., :-1], (1, 0), value=1.0).cummin(-1)[0]  # (B, i, b): min over gaps i..b-1
    p_right = (survival - F.pad(survival[..., 1:], (0, 1))).triu()  # (B, i, b), end of sequence closes
    return p_left, survival, p_right


def dependency_distributions(distance: torch.Tensor, height: torch.Tensor, scale_distance: torch.Tensor,
                             scale_height: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """distance, height (B, L) -> parent, child (B, L, L) with parent[i, h] = P(h is i's parent).

    causal=False is the paper's bidirectional mask (child = parentᵀ); causal=True gives row i from the
    prefix x_0..x_i only (see the module docstring), zero for keys after i. Diagonals are 0.
    """
    L = distance.shape[-1]
    p_left, survival, p_right = boundaries(distance, height, scale_distance)
    head = span_heads(height, scale_height)  # (B, a, b, h)
    eye = torch.eye(L, dtype=torch.bool, device=distance.device)
    if not causal:
        parent = torch.einsum("bia,bij,bajh->bih", p_left, p_right, head).masked_fill(eye, 0)
        return parent, parent.transpose(1, 2)
    idx = torch.arange(L, device=distance.device)
    head_ending_here = head[:, :, idx, :]  # (B, a, i, h): spans [a, i]
    parent = torch.einsum("bia,baih->bih", p_left, head_ending_here).masked_fill(eye, 0)
    head_of_end = head_ending_here[:, :, idx, idx]  # (B, a, i): P(i heads [a, i])
    child_t = survival * (p_left @ head_of_end)  # (B, j, i): j's constituent reaches i and i heads it
    return parent, child_t.transpose(1, 2).tril(-1)


class Parser(nn.Module):
    """Causal conv parser: embeddings (B, L, D) -> distance (B, L) (gap after each token), height (B, L)."""

    def __init__(self, d_model: int, layers: int, conv_size: int) -> None:
        super().__init__()
        self.conv_size = conv_size
        self.convs = nn.ModuleList(nn.Conv1d(d_model, d_model, conv_size) for _ in range(layers))
        self.distance_ff = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model, elementwise_affine=False),
                                         nn.Tanh(), nn.Linear(d_model, 1))
        self.height_ff = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model, elementwise_affine=False),
                                       nn.Tanh(), nn.Linear(d_model, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.transpose(1, 2)  # (B, D, L)
        for conv in self.convs:
            h = conv(F.pad(h, (self.conv_size - 1, 0)))  # left padding: position t sees t-K+1..t
            h = torch.tanh(F.layer_norm(h.transpose(1, 2), h.shape[1:2])).transpose(1, 2)
        h = h.transpose(1, 2)  # (B, L, D)
        return self.distance_ff(h).squeeze(-1), self.height_ff(h).squeeze(-1)


class DependencyAttention(nn.Module):
    """``forward(x (B, L, D), relations (B, 2, L, L))``: sigmoid attention scores gated by the dependency mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv_proj = column_linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)
        self.relation_logits = nn.Parameter(torch.empty(cfg.n_heads, 2))  # (H, parent/child)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.relation_logits, std=0.1)  # as the reference code

    def forward(self, x: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv_proj(x).view(B, L, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # (B, H, L, hd)
        mask = torch.einsum("hr,brij->bhij", torch.softmax(self.relation_logits, -1), relations)  # (B, H, L, L)
        probs = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)) * mask  # (B, H, L, L)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(B, L, D))


class StructFormer(nn.Module):
    """Causal StructFormer LM: ``forward(input_ids (B, L), labels=None)`` -> logits (B, L, V) or mean loss.

    ``model.layers`` must be all ``A`` (every layer is dependency-constrained attention); ``model.ffn``
    picks each layer's feed-forward as usual.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be set (> 0) to build a StructFormer, got {cfg.vocab_size}")
        plan = parse_pattern(cfg.layers, cfg.ffn)
        if any(layer.mixer != "attention" for layer in plan.layers):
            raise ConfigError(f"model.layers for model.arch 'structformer' must be all 'A' (dependency-constrained "
                              f"attention), got '{cfg.layers}'")
        init_seed = draw_init_seed()  # before any submodule draws from the global generator
        self.cfg = cfg
        opts = layer_options(cfg, "structformer", StructFormerOptions)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.parser = Parser(cfg.d_model, opts.parser_layers, opts.conv_size)
        self.log_scales = nn.Parameter(torch.zeros(2))  # exp -> (distance scale, height scale)
        self.norms1 = nn.ModuleList(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) for _ in plan.layers)
        self.attns = nn.ModuleList(DependencyAttention(cfg) for _ in plan.layers)
        self.norms2 = nn.ModuleList(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) for _ in plan.layers)
        self.ffns = nn.ModuleList(build_ffn(layer.ffn, cfg, i) for i, layer in enumerate(plan.layers))
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.weight_init = GPT2Init(init_seed, cfg.init_std, residual_layers=len(self.attns))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init as LanguageModel's (projections N(0, init_std), residual outputs / sqrt(2 n_layers))."""
        self.weight_init(self)
        with torch.no_grad():
            self.log_scales.zero_()

    def relations(self, h: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, L, D) -> causal (parent, child) distributions stacked as (B, 2, L, L), in fp32."""
        distance, height = self.parser(h)
        scales = self.log_scales.exp()
        parent, child = dependency_distributions(distance.float(), height.float(), scales[0], scales[1], causal=True)
        return torch.stack([parent, child], dim=1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, V), or the mean fp32 cross-entropy against `labels` (B, L)."""
        h = self.drop(self.embedding(input_ids))  # (B, L, D)
        rel = self.relations(h).to(h.dtype)  # (B, 2, L, L)
        for norm1, attn, norm2, ffn in zip(self.norms1, self.attns, self.norms2, self.ffns):
            h = h + self.drop(attn(norm1(h), rel))
            h = h + self.drop(ffn(norm2(h)))
        logits = F.linear(self.norm(h), self.embedding.weight)  # tied head, (B, L, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
