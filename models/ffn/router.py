"""Mixture-of-experts routers: Switch (top-1, Fedus et al. 2021) and GLaM/GShard (top-2, Du et al. 2022).

One base class does everything the policies share, in fp32 whatever the model dtype (softmax over
bf16 logits flips top-1 choices and makes the z-loss meaningless): logits, optional jitter, router
z-loss, the load-balancing loss, capacity slots and the metrics. A policy overrides one method,
``_assign``, which picks each token's experts and gates.

Dropless routing (the default, as MegaBlocks) keeps every assignment: the layer sorts them by expert
and each expert multiplies exactly its tokens. Capacity-based routing (``moe_dropless=false``, the
Switch and GLaM papers) gives each expert a fixed number of slots per routed group (here: the tokens
of one rank's micro-batch); assignments past it are dropped, the token's output from that expert is
zero and the residual stream carries the token unchanged.
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
    """What a router decided for T tokens, E experts, k choices per token and (capacity mode) C slots per expert.

    expert_index:      (T, k) int64; each token's experts, best first.
    gate:              (T, k) fp32; the weight by which that expert's output is added back to the token
                       (0 where dropped, so a fully dropped token's MoE output is 0 and the residual
                       stream carries it unchanged).
    slot:              (T, k) int64; the slot that choice holds in its expert's buffer, -1 where dropped;
                       None when dropless.
    capacity:          C, slots per expert; None when dropless (every assignment is kept).
    aux_loss:          () fp32; load-balancing loss, already multiplied by its coefficient alpha.
    z_loss:            () fp32; router z-loss, already multiplied by its coefficient.
    tokens_per_expert: (E,) fp32; assignments each expert received before capacity (all k choices).
    dropped_fraction:  () fp32; share of the T*k assignments that did not fit their expert's capacity (0 when
                       dropless).

    In capacity mode ``dispatch_mask`` (T, E, C) and ``combine_weights`` (T, E, C) give the same decision in
    Mesh TensorFlow's dense form; the layer itself works from the (T, k) indices, which cost O(T k) memory.
    """

    expert_index: torch.Tensor
    gate: torch.Tensor
    slot: torch.Tensor | None
    capacity: int | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.shape[0]

    @property
    def dropless(self) -> bool:
        return self.capacity is None

    @property
    def top_k(self) -> int:
        return self.expert_index.shape[1]

    @property
    def kept(self) -> torch.Tensor:
        """(T, k) bool: the assignments that fit (all of them when dropless)."""
        return torch.ones_like(self.expert_index, dtype=torch.bool) if self.slot is None else self.slot >= 0

    @property
    def imbalance(self) -> torch.Tensor:
        """() fp32: the busiest expert's assignments over the mean, 1 when balanced, E when one expert takes all.

        The capacity factor a capacity-based layer would have needed to drop nothing on this group; under
        expert parallelism the busiest expert's rank sets the step's pace.
        """
        return self.tokens_per_expert.max() / self.tokens_per_expert.mean().clamp(min=1e-9)

    def _dense_slots(self) -> torch.Tensor:
        if self.slot is None:
            raise ValueError("dispatch_mask and combine_weights are the capacity mode's dense (T, E, C) form; "
                             "dropless routing has no slots")
        return self.slot

    @property
    def combine_weights(self) -> torch.Tensor:
        """(T, E, C) fp32: gate at [t, expert, slot] of every kept assignment, 0 elsewhere (capacity mode)."""
        t, k = self._dense_slots().shape
        dense = self.gate.new_zeros(t, self.num_experts, self.capacity)
        rows = torch.arange(t, device=self.slot.device)[:, None].expand(t, k)
        kept = self.kept
        dense[rows[kept], self.expert_index[kept], self.slot[kept]] = self.gate[kept]
        return dense

    @property
    def dispatch_mask(self) -> torch.Tensor:
        """(T, E, C) bool: True where token t takes slot c of expert e (capacity mode)."""
        t, k = self._dense_slots().shape
        dense = torch.zeros(t, self.num_experts, self.capacity, dtype=torch.bool, device=self.slot.device)
        rows = torch.arange(t, device=self.slot.device)[:, None].expand(t, k)
        kept = self.kept
        dense[rows[kept], self.expert_index[kept], self.slot[kept]] = True
        return dense


class Router(nn.Module, ABC):
    """Linear router ``d_model -> num_experts`` plus the routing policy's bookkeeping.

    Subclasses implement ``_assign``; ``forward`` turns its choices into a RoutingResult, with capacity slots
    unless ``dropless``.
    """

    top_k: int = 1

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 1.25,
                 eval_capacity_factor: float = 2.0, min_capacity: int = 4, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 1e-3, jitter: float = 0.0, dropless: bool = True) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dropless = dropless
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
                   cfg.aux_loss_coef, cfg.z_loss_coef, cfg.jitter, cfg.moe_dropless)

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
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (T, 1)
        z_loss = lse.square().mean()  # ST-MoE eq. 5
        # The softmax from the z-loss's logsumexp: torch's softmax over a last dim of E = 8 is slow on CPU (fwd +
        # bwd of this router at 2,048 tokens x 256: 1.13 vs 1.59 ms, 1 thread, Xeon), and equal to ~1 ulp.
        probs = torch.exp(logits - lse)  # (T, E)
        index, gate = self._assign(probs)  # (T, k), (T, k)
        # Switch eq. 4: alpha * N * sum_i f_i * P_i, with f_i the share of tokens whose first choice is expert i.
        f = torch.bincount(index[:, 0], minlength=self.num_experts).float() / index.shape[0]  # (E,)
        p = probs.mean(dim=0)  # (E,)
        aux = self.num_experts * torch.sum(f * p)
        with torch.no_grad():
            tokens_per_expert = torch.bincount(index.flatten(), minlength=self.num_experts).float()
        capacity = slot = None
        if not self.dropless:
            capacity = self.capacity(x.shape[0])
            slot = self.slots(index, capacity)
            gate = gate * (slot >= 0)
        dropped = x.new_zeros(()) if slot is None else 1.0 - (slot >= 0).float().mean()
        return RoutingResult(expert_index=index, gate=gate, slot=slot, capacity=capacity,
                             aux_loss=self.aux_loss_coef * aux, z_loss=self.z_loss_coef * z_loss,
                             tokens_per_expert=tokens_per_expert, dropped_fraction=dropped)

    def slots(self, index: torch.Tensor, capacity: int) -> torch.Tensor:
        """Choices (T, k) -> their slots (T, k) in their experts' buffers, -1 past ``capacity``.

        Tokens queue in order, and choice j queues behind every kept choice < j for the same expert (GShard's
        implementation), so under pressure a token's second expert is dropped before any token's first.
        """
        taken = torch.zeros(self.num_experts, dtype=torch.long, device=index.device)  # (E,) slots already filled
        slots = []
        for j in range(index.shape[1]):
            slots.append(_slots(index[:, j], self.num_experts, taken, capacity))
            taken = (taken + torch.bincount(index[:, j], minlength=self.num_experts)).clamp(max=capacity)
        return torch.stack(slots, dim=1)

    @abstractmethod
    def _assign(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """probs (T, E) fp32 -> experts (T, k) int64, best first, and their gates (T, k) fp32."""


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

    def _assign(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, index = probs.max(dim=-1)  # (T,), (T,)
        return index[:, None], gate[:, None]


class GLaMRouter(Router):
    """Top-2 routing (GShard, used by GLaM): best and second-best expert, gates renormalised to sum to 1.

    With capacity, a token whose second expert is dropped keeps only its first-expert output, weighted by
    its (renormalised) first gate.
    """

    top_k = 2

    def _assign(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, index = probs.topk(2, dim=-1)  # (T, 2), (T, 2): best first
        return index, gate / gate.sum(dim=-1, keepdim=True)  # softmax probabilities: the sum is positive


ROUTERS: dict[int, type[Router]] = {1: SwitchRouter, 2: GLaMRouter}


def build_router(cfg: ModelConfig) -> Router:
    """The routing policy for ``cfg.top_k`` (1: Switch, 2: GLaM)."""
    return ROUTERS[cfg.top_k].from_config(cfg)
