"""Mixture-of-experts routers: Switch (top-1, Fedus et al. 2021) and GLaM/GShard (top-2, Du et al. 2022).

One base class does everything the policies share, in fp32 whatever the model dtype (softmax over
bf16 logits flips top-1 choices and makes the z-loss meaningless): logits, optional jitter, router
z-loss, the load-balancing loss and the metrics. A policy overrides one method, ``_assign``, which
picks each token's experts and gates. Capacity is per expert and per routed group (here: the tokens
of one rank's micro-batch); assignments past it are dropped, the token's output from that expert
is zero and the residual stream carries the token unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.models.config import ModelConfig

INIT_SCALE = 0.1  # Switch Transformer §2.3: weights ~ truncated N(0, 0.1 / fan_in) train stably


def switch_init_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Truncated normal with variance INIT_SCALE / fan_in, cut at two standard deviations (Switch's init)."""
    std = math.sqrt(INIT_SCALE / fan_in)
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


@dataclass
class RoutingResult:
    """What a router decided for T tokens, E experts, k choices per token and C slots per expert.

    expert_index:      (T, k) int64; each token's experts, best first.
    slot:              (T, k) int64; the slot that choice holds in its expert's buffer, -1 where dropped.
    gate:              (T, k) fp32; the weight by which that expert's output is added back to the token
                       (0 where dropped, so a fully dropped token's MoE output is 0 and the residual
                       stream carries it unchanged).
    capacity:          C, slots per expert.
    aux_loss:          () fp32; load-balancing loss, already multiplied by its coefficient alpha.
    z_loss:            () fp32; router z-loss, already multiplied by its coefficient.
    tokens_per_expert: (E,) fp32; assignments each expert received before capacity (all k choices).
    dropped_fraction:  () fp32; share of the T*k assignments that did not fit their expert's capacity.

    ``dispatch_mask`` (T, E, C) and ``combine_weights`` (T, E, C) give the same decision in Mesh
    TensorFlow's dense form; the layer itself works from the (T, k) indices, which cost O(T k) memory.
    """

    expert_index: torch.Tensor
    slot: torch.Tensor
    gate: torch.Tensor
    capacity: int
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.shape[0]

    @property
    def kept(self) -> torch.Tensor:
        """(T, k) bool: the assignments that fit."""
        return self.slot >= 0

    @property
    def combine_weights(self) -> torch.Tensor:
        """(T, E, C) fp32: gate at [t, expert, slot] of every kept assignment, 0 elsewhere."""
        t, k = self.slot.shape
        dense = self.gate.new_zeros(t, self.num_experts, self.capacity)
        rows = torch.arange(t, device=self.slot.device)[:, None].expand(t, k)
        kept = self.kept
        dense[rows[kept], self.expert_index[kept], self.slot[kept]] = self.gate[kept]
        return dense

    @property
    def dispatch_mask(self) -> torch.Tensor:
        """(T, E, C) bool: True where token t takes slot c of expert e."""
        t, k = self.slot.shape
        dense = torch.zeros(t, self.num_experts, self.capacity, dtype=torch.bool, device=self.slot.device)
        rows = torch.arange(t, device=self.slot.device)[:, None].expand(t, k)
        kept = self.kept
        dense[rows[kept], self.expert_index[kept], self.slot[kept]] = True
        return dense


class Router(nn.Module, ABC):
    """Linear router ``d_model -> num_experts`` plus the routing policy's bookkeeping.

    Subclasses implement ``_assign``; ``forward`` turns its choices into a RoutingResult.
    """

    top_k: int = 1

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 1.25,
                 eval_capacity_factor: float = 2.0, min_capacity: int = 4, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 1e-3, jitter: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.jitter = jitter
        # A raw parameter, not nn.Linear: the LM re-initialises every nn.Linear at GPT-2 scale.
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Router:
        return cls(cfg.d_model, cfg.num_experts, cfg.capacity_factor, cfg.eval_capacity_factor, cfg.min_capacity,
                   cfg.aux_loss_coef, cfg.z_loss_coef, cfg.jitter)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            switch_init_(self.weight, self.weight.shape[1])

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert: ceil(factor * k * T / E), at least ``min_capacity``, never more than T."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        slots = math.ceil(factor * self.top_k * num_tokens / self.num_experts)
        return max(1, min(num_tokens, max(self.min_capacity, slots)))

    def forward(self, x: torch.Tensor) -> RoutingResult:
        """x: (T, D) tokens of one routing group -> RoutingResult."""
        x = x.float()
        if self.training and self.jitter > 0:
            # Switch §2.4: multiplicative noise on the router input explores other experts early on.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.weight.float())  # (T, E)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()  # ST-MoE eq. 5
        probs = torch.softmax(logits, dim=-1)  # (T, E)
        capacity = self.capacity(x.shape[0])
        first_choice, index, slot, gate = self._assign(probs, capacity)
        # Switch eq. 4: alpha * N * sum_i f_i * P_i, with f_i the share of tokens whose first choice is expert i.
        f = first_choice.float().mean(dim=0)  # (E,)
        p = probs.mean(dim=0)  # (E,)
        aux = self.num_experts * torch.sum(f * p)
        kept = slot >= 0
        with torch.no_grad():
            tokens_per_expert = torch.bincount(index.flatten(), minlength=self.num_experts).float()
            dropped = 1.0 - kept.float().mean()
        return RoutingResult(expert_index=index, slot=slot, gate=gate * kept, capacity=capacity,
                             aux_loss=self.aux_loss_coef * aux, z_loss=self.z_loss_coef * z_loss,
                             tokens_per_expert=tokens_per_expert, dropped_fraction=dropped)

    @abstractmethod
    def _assign(self, probs: torch.Tensor, capacity: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """probs (T, E) fp32 -> first-choice one-hot (T, E) bool, experts (T, k), slots (T, k) (-1: dropped),
        gates (T, k) fp32 before dropping."""


def _slots(index: torch.Tensor, num_experts: int, offset: torch.Tensor, capacity: int) -> torch.Tensor:
    """Give each token's choice ``index`` (T,) the next free slot of that expert in token order.

    ``offset`` (E,) counts slots already taken. Returns (T,) slots, -1 where the expert is full.
    """
    one_hot = F.one_hot(index, num_experts)  # (T, E)
    position = (torch.cumsum(one_hot, dim=0) - 1).gather(1, index[:, None]).squeeze(1) + offset[index]  # (T,)
    return torch.where(position < capacity, position, -1)


class SwitchRouter(Router):
    """Top-1 routing (Switch Transformer): each token goes to its argmax expert, gated by that probability."""

    top_k = 1

    def _assign(self, probs: torch.Tensor, capacity: int):
        gate, index = probs.max(dim=-1)  # (T,), (T,)
        slot = _slots(index, self.num_experts, torch.zeros_like(probs[0], dtype=torch.long), capacity)
        return F.one_hot(index, self.num_experts).bool(), index[:, None], slot[:, None], gate[:, None]


class GLaMRouter(Router):
    """Top-2 routing (GShard, used by GLaM): best and second-best expert, gates renormalised to sum to 1.

    Second choices queue behind every first choice for the same expert, so under pressure a token's
    second expert is dropped before any token's first; a token whose second expert is dropped keeps
    only its first-expert output, weighted by its (renormalised) first gate.
    """

    top_k = 2

    def _assign(self, probs: torch.Tensor, capacity: int):
        gate1, index1 = probs.max(dim=-1)  # (T,)
        first = F.one_hot(index1, self.num_experts).bool()  # (T, E)
        gate2, index2 = probs.masked_fill(first, float("-inf")).max(dim=-1)
        denom = gate1 + gate2  # softmax probabilities: strictly positive
        slot1 = _slots(index1, self.num_experts, torch.zeros_like(probs[0], dtype=torch.long), capacity)
        # As GShard's implementation: second choices start after the first choices that were kept.
        kept_first = first.sum(dim=0).clamp(max=capacity)  # (E,)
        slot2 = _slots(index2, self.num_experts, kept_first, capacity)
        index = torch.stack([index1, index2], dim=1)  # (T, 2)
        return first, index, torch.stack([slot1, slot2], dim=1), torch.stack([gate1, gate2], dim=1) / denom[:, None]


ROUTERS: dict[int, type[Router]] = {1: SwitchRouter, 2: GLaMRouter}


def build_router(cfg: ModelConfig) -> Router:
    """The routing policy for ``cfg.top_k`` (1: Switch, 2: GLaM)."""
    return ROUTERS[cfg.top_k].from_config(cfg)
