"""Mixture-of-experts feed-forward: a router picks experts per token, experts are GELU MLPs.

The layer never sees ranks. It routes, then hands tokens and the routing to ``self.experts``, a
dispatcher module that owns the expert weights: ``LocalExperts`` here (all experts on this rank);
``parallel.expert`` swaps in one that keeps a slice of the experts and exchanges tokens with
all-to-all. Both are called as ``experts(tokens (T, D), routing) -> (T, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.router import RoutingResult, build_router, switch_init_


class Expert(nn.Module):
    """One expert: d_model -> d_ffn -> d_model GELU MLP on (..., D) tokens.

    Raw parameters (not nn.Linear) so the LM's GPT-2 re-initialisation leaves the Switch 0.1x init alone.
    """

    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(d_ffn, d_model))
        self.b_in = nn.Parameter(torch.empty(d_ffn))
        self.w_out = nn.Parameter(torch.empty(d_model, d_ffn))
        self.b_out = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            switch_init_(self.w_in, self.w_in.shape[1])
            switch_init_(self.w_out, self.w_out.shape[1])
            self.b_in.zero_()
            self.b_out.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, self.w_in, self.b_in), approximate="tanh"), self.w_out, self.b_out)


def _kept(routing: RoutingResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token index, flat slot index (expert * C + slot) and gate of every kept assignment, each (N,)."""
    t, k = routing.slot.shape
    kept = routing.kept  # (T, k)
    tokens = torch.arange(t, device=kept.device)[:, None].expand(t, k)[kept]
    return tokens, routing.expert_index[kept] * routing.capacity + routing.slot[kept], routing.gate[kept]


def dispatch(tokens: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
    """tokens (T, D) -> per-expert slots (E, C, D); empty slots are zero."""
    t, slot, _ = _kept(routing)
    slots = tokens.new_zeros(routing.num_experts * routing.capacity, tokens.shape[-1])  # (E * C, D)
    return slots.index_copy(0, slot, tokens[t]).view(routing.num_experts, routing.capacity, -1)


def combine(expert_out: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
    """expert outputs (E, C, D) -> tokens (T, D), each the gate-weighted sum over its kept slots."""
    t, slot, gate = _kept(routing)
    out = expert_out.new_zeros(routing.slot.shape[0], expert_out.shape[-1])  # (T, D)
    return out.index_add(0, t, expert_out.flatten(0, 1)[slot] * gate.to(expert_out.dtype)[:, None])


class LocalExperts(nn.Module):
    """All experts on this process: dispatch, run each expert on its slots, combine."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(experts)

    def forward(self, tokens: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
        slots = dispatch(tokens, routing)  # (E, C, D)
        out = torch.stack([expert(slots[e]) for e, expert in enumerate(self.mlps)])  # (E, C, D)
        return combine(out, routing)


class MoE(nn.Module):
    """Token-choice MoE feed-forward (Switch at ``top_k=1``, GLaM at 2) on (..., D) inputs.

    After each forward ``last`` holds the RoutingResult, whose aux and z losses the LM adds to its loss.

    Tensor parallelism keeps it whole on every tensor rank (no expert tensor parallelism, as
    Megatron-DeepSpeed): its input follows a row-parallel all-reduce, so every tensor rank routes the same
    tokens and computes the same output, and its parameters count as replicated (clipping norm, checkpoints).
    """

    supports_tensor_parallel = True

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = build_router(cfg)
        self.experts: nn.Module = LocalExperts([Expert(cfg.d_model, cfg.ffn_dim) for _ in range(cfg.num_experts)])
        self.last: RoutingResult | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D); position-wise, so it also serves the one-token decoding step."""
        tokens = x.reshape(-1, x.shape[-1])  # (T, D), T = product of leading dims
        routing = self.router(tokens)
        self.last = routing
        return self.experts(tokens, routing).reshape(x.shape)
