"""Decoder-only language model over a hybrid stack of mixers, e.g. H3 with a few attention layers.

token embedding -> Block x n_layers (from the ``cfg.layers`` pattern) -> LayerNorm -> LM head.
There is no positional embedding: H3's shift and diagonal SSMs are causal convolutions and so
already encode order; attention layers may add rotary embeddings (``cfg.rotary_dim``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models import roles
from hybrid_pretrain.models.block import Block
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn import build_ffn
from hybrid_pretrain.models.ffn.moe import MoE
from hybrid_pretrain.models.init import GPT2Init, draw_init_seed
from hybrid_pretrain.models.mixers import build_mixer
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.models.roles import column_linear


def make_block(cfg: ModelConfig, layer_idx: int) -> Block:
    """Layer ``layer_idx`` of the stack: its mixer and feed-forward from the pattern, pre-norms around them."""
    layer = parse_pattern(cfg.layers, cfg.ffn).layers[layer_idx]
    return Block(
        build_mixer(layer.mixer, cfg, layer_idx),
        build_ffn(layer.ffn, cfg, layer_idx),
        roles.layer_norm(cfg.d_model, cfg.norm_eps),  # nn.LayerNorm unless sequence parallelism is on
        roles.layer_norm(cfg.d_model, cfg.norm_eps),
        dropout=cfg.dropout,
    )


class LanguageModel(nn.Module):
    """Causal LM: ``forward(input_ids (B, L), labels=None)``; generation via ``allocate_state``/``step``.

    Parallelism stays outside: projections, the embedding, the norms and the loss come from ``parallel/``
    (plain torch at TP=1); ``parallel.pipeline`` cuts the same layers into stages. Under sequence
    parallelism the embedding returns this rank's positions, the blocks keep them and the head gathers
    the whole sequence back, so nothing here changes shape-wise for the caller. ``checkpoint_activations``
    recomputes each block in the backward pass instead of keeping its activations.
    """

    checkpoint_activations: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ConfigError(
                f"model.vocab_size must be set (> 0) to build a LanguageModel, got {cfg.vocab_size}; "
                "take it from the tokenizer before building"
            )
        init_seed = draw_init_seed()  # before any submodule draws from the global generator
        self.cfg = cfg
        self.plan = parse_pattern(cfg.layers, cfg.ffn)
        self.embedding = roles.vocab_embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(make_block(cfg, i) for i in range(len(self.plan.layers)))
        self.moe_layers = [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]  # views, not modules
        self.norm = roles.layer_norm(cfg.d_model, cfg.norm_eps)
        # Tied: the head reuses the embedding matrix (saves V x D parameters, GPT-2 practice).
        self.lm_head = None if cfg.tie_embeddings else column_linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.weight_init = GPT2Init(init_seed, cfg.init_std, residual_layers=len(self.blocks))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: projections and embedding ~ N(0, init_std), biases 0, residual outputs / sqrt(2 n_layers).

        Also the way to materialise a model built on the meta device: ``to_empty(device=...)`` then this.
        Submodules (norms, SSMs) first apply their own init; projections are then overwritten. Each module
        draws from its own seeded generator (models.init), so ``parallel.build`` can make one rank's share alone.
        """
        self.weight_init(self)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., V), or this rank's (..., V / TP) under tensor parallelism."""
        h = self.norm(h)
        return roles.tied_logits(h, self.embedding.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, L) token ids.

        Returns logits (B, L, V) when `labels` is None; otherwise the mean fp32 cross-entropy over
        positions whose label is not -100, plus every MoE layer's load-balancing and z losses (already
        scaled by their coefficients). `labels` (B, L) is aligned with the logits: labels[:, t] is
        the token to predict after input_ids[:, t] (the data pipeline does the shift).
        """
        h = self.drop(self.embedding(input_ids))  # (B, L, D), or (B, L / TP, D) under sequence parallelism
        for block in self.blocks:
            if self.checkpoint_activations and self.training:
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        logits = self._logits(h)  # (B, L, V) or (B, L, V / TP)
        if labels is None:
            return roles.full_logits(logits)
        loss = roles.cross_entropy(logits, labels)
        for layer in self.moe_layers:
            loss = loss + layer.last.aux_loss + layer.last.z_loss
        return loss

    def moe_metrics(self) -> dict[str, float]:
        """Routing statistics of the last forward, summed (losses, token counts) or averaged over MoE layers.

        Empty for a dense model. ``moe_imbalance`` is each layer's busiest expert over the mean (the capacity
        factor that would have dropped nothing); capacity-based layers also report ``moe_dropped_fraction``.
        Per-expert token counts are listed for up to 16 experts; beyond that only the busiest and idlest
        expert's load relative to a uniform share.
        """
        routed = [layer.last for layer in self.moe_layers if layer.last is not None]
        if not routed:
            return {}
        tokens = torch.stack([r.tokens_per_expert for r in routed]).sum(dim=0)  # (E,)
        load = tokens / tokens.mean().clamp(min=1e-9)
        out = {
            "moe_aux_loss": sum(r.aux_loss.item() for r in routed),
            "moe_z_loss": sum(r.z_loss.item() for r in routed),
            "moe_imbalance": sum(r.imbalance.item() for r in routed) / len(routed),
            "moe_load_max": load.max().item(),
            "moe_load_min": load.min().item(),
        }
        if not self.cfg.moe_dropless:
            out["moe_dropped_fraction"] = sum(r.dropped_fraction.item() for r in routed) / len(routed)
        if tokens.numel() <= 16:
            out.update({f"moe_tokens_expert_{e}": n for e, n in enumerate(tokens.tolist())})
        return out

    def step_metrics(self) -> dict[str, float]:
        """What the training loop logs each step beside the loss: the MoE routing statistics."""
        return self.moe_metrics()

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> list:
        """Per-block recurrent states for generating up to `max_len` tokens."""
        return [block.allocate_state(batch_size, max_len, device=device, dtype=dtype) for block in self.blocks]

    def step(self, input_ids: torch.Tensor, state: list) -> torch.Tensor:
        """input_ids: (B,) the next token per sequence -> logits (B, V) for the token after it."""
        h = self.drop(self.embedding(input_ids))  # (B, D)
        for block, block_state in zip(self.blocks, state):
            h = block.step(h, block_state)
        return roles.full_logits(self._logits(h))
