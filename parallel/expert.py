"""Expert parallelism: each rank of an expert-parallel group keeps ``num_experts / EP`` experts of every MoE layer.

Choice of machinery, and why:
- Token exchange is ``torch.distributed.all_to_all_single`` (native on gloo and NCCL) in small autograd
  functions. Dropless routing sends each rank exactly the rows for its experts: the per-expert row counts
  go first (one small all-to-all), then the rows with those split sizes, and back the same way. Capacity
  routing exchanges the dense (E, C, D) slots in equal chunks. DeepSpeed's ``MOELayer`` only runs its own
  ``TopKGate`` internals, and megatron-core's dispatcher needs CUDA streams.
- The expert weights live in a ``deepspeed.moe.layer.MoE`` subclass. That is what makes DeepSpeed's
  engine treat them as expert parameters: their gradients are all-reduced over the
  expert-data-parallel group only (a plain DP all-reduce would average different experts together),
  ZeRO partitions their optimizer states over that group, and checkpoints store one file per
  global expert, which loads back at any EP size. Its own gate is never called.

At EP=1 the same container runs without any exchange, so checkpoints look alike at every EP size.

Composition (no expert tensor parallelism, as Megatron-DeepSpeed): under tensor parallelism the MoE input
follows a row-parallel all-reduce, so it is identical on every tensor rank; each tensor rank routes the
same tokens and runs whole experts, and the expert-parallel group joins data-parallel ranks of one tensor
rank (parallel.groups). Under pipeline parallelism each stage's MoE layers exchange tokens within that
stage's data-parallel ranks, and their aux and z losses ride to the last stage's loss (parallel.pipeline).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.distributed as dist
from torch import nn

from hybrid_pretrain.models.ffn.moe import (
    LocalExperts,
    MoE,
    combine,
    combine_sorted,
    dispatch,
    dispatch_sorted,
    expert_mlps,
    sort_by_expert,
)
from hybrid_pretrain.models.ffn.router import RoutingResult


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel groups of size ``ep_size`` (its engine looks them up by it)."""
    return f"ep_size_{ep_size}"


def expert_parallel_group(ep_size: int) -> dist.ProcessGroup | None:
    """This rank's expert-parallel group of size ``ep_size`` (created by parallel.groups.initialize)."""
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(expert_group_name(ep_size)) if ep_size > 1 else None


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's place in its expert-parallel group: it holds experts ``[rank * E/EP, (rank + 1) * E/EP)``."""
    return dist.get_rank(expert_parallel_group(ep_size)) if ep_size > 1 else 0


# A DeepSpeed expert container's parameter: in memory the index is local, in checkpoint files global.
EXPERT_KEY = re.compile(r"^(.*)\.experts\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.*)$")


def single_rank_expert_name(name: str, ep_rank: int = 0, n_local: int = 0) -> str:
    """A container parameter name -> the single-rank LanguageModel's name.

    ``blocks.1.ffn.experts.deepspeed_moe.experts.deepspeed_experts.1.w_in`` on expert-parallel rank 1 with
    2 local experts -> ``blocks.1.ffn.experts.mlps.3.w_in``; with the defaults the index is kept (checkpoint
    files number experts globally). Other names are returned unchanged.
    """
    m = EXPERT_KEY.match(name)
    if not m:
        return name
    return f"{m.group(1)}.experts.mlps.{ep_rank * n_local + int(m.group(2))}.{m.group(3)}"


@functools.cache
def _container_class() -> type[nn.Module]:
    """Defined on first use so importing this module does not import DeepSpeed."""
    # optional: DeepSpeed only on engine paths (importing it probes accelerators and logs)
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallelExperts(DeepSpeedMoE):
        """``(tokens (T, D), routing) -> (T, D)`` with this rank's experts; tokens travel by all-to-all."""

        group: dist.ProcessGroup | None = None

        def forward(self, tokens: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
            if routing.dropless:
                return self._dropless(tokens, routing)
            slots = dispatch(tokens, routing)  # (E, C, D), E in global expert order
            experts = self.deepspeed_moe.experts.deepspeed_experts
            if self.ep_size > 1:
                slots = _exchange(slots, self.group)  # (E, C, D): (EP source ranks x local experts, C, D)
            e_local, cap, d = len(experts), slots.shape[1], slots.shape[2]
            per_expert = slots.reshape(self.ep_size, e_local, cap, d)
            out = torch.stack([expert(per_expert[:, i]) for i, expert in enumerate(experts)], dim=1)
            out = out.reshape(self.ep_size * e_local, cap, d)  # (E, C, D) back in source-rank order
            if self.ep_size > 1:
                out = _exchange(out, self.group)  # (E, C, D) in global expert order again
            return combine(out, routing)

        def _dropless(self, tokens: torch.Tensor, routing: RoutingResult) -> torch.Tensor:
            order, inverse, counts = sort_by_expert(routing)  # counts (E,) in global expert order
            rows = dispatch_sorted(tokens, order, inverse, routing.top_k)  # (T*k, D) grouped by global expert
            experts = self.deepspeed_moe.experts.deepspeed_experts
            if self.ep_size == 1:
                return combine_sorted(expert_mlps(rows, experts, counts.tolist()), order, inverse, routing)
            exchange = _RowExchange(counts, len(experts), self.group)
            mine = exchange.send(rows)  # (R, D): every rank's rows for this rank's experts, grouped by expert
            out = exchange.receive(expert_mlps(mine, experts, exchange.local_sizes))  # (T*k, D) as ``rows``
            return combine_sorted(out, order, inverse, routing)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by the engine; our groups were made in parallel.groups.initialize."""
            self.group = expert_parallel_group(self.ep_size)

    return ExpertParallelExperts


class _UnusedGate(nn.Module):
    """Stands in for DeepSpeed's TopKGate, which our router replaces (it would add an unused weight)."""

    def _set_ep_group(self, group: object) -> None:
        pass


def build_expert_parallel(layer: MoE, ep_size: int, ep_rank: int) -> nn.Module:
    """A container holding experts ``[ep_rank * E/EP, (ep_rank + 1) * E/EP)`` of ``layer``, copied by value.

    A layer on the meta device gives a container on the meta device (``parallel.materialize`` fills it).
    """
    n_local = layer.num_experts // ep_size
    template = layer.experts.mlps[0]
    # DeepSpeed deep-copies the template per local expert and marks each parameter allreduce=False.
    container = _container_class()(hidden_size=template.w_out.shape[0], expert=template,
                                      num_experts=layer.num_experts, ep_size=ep_size, k=layer.top_k)
    container.deepspeed_moe.gate = _UnusedGate()
    # Without process groups (a rank's model built for inspection, e.g. bench/startup_memory.py) there is no group.
    container.group = expert_parallel_group(ep_size) if dist.is_initialized() else None
    if template.w_in.is_meta:
        return container
    with torch.no_grad():
        for i, expert in enumerate(container.deepspeed_moe.experts.deepspeed_experts):
            source = layer.experts.mlps[ep_rank * n_local + i]
            for dst, src in zip(expert.parameters(), source.parameters()):
                dst.copy_(src)
    return container


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all whose backward is the reverse all-to-all.

    Hand-written (a few lines, as DeepSpeed's own ``_AllToAll``): torch's autograd wrapper in
    ``torch.distributed.nn.functional`` is deprecated and its replacement is a private module.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # before empty_like, which would copy a non-contiguous layout into the output
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllToAll.apply(grad, ctx.group), None


def _exchange(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Chunk j of ``x`` along dim 0 goes to rank j of ``group``; rank j's chunk for us lands at position j."""
    return _AllToAll.apply(x, group)


class _AllToAllV(torch.autograd.Function):
    """All-to-all with per-rank split sizes; the backward sends the gradients back with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, out_splits: list[int], in_splits: list[int]
                ) -> torch.Tensor:
        ctx.group, ctx.splits = group, (in_splits, out_splits)
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _AllToAllV.apply(grad, ctx.group, *ctx.splits), None, None, None


class _RowExchange:
    """Dropless token exchange of one MoE layer: rows sorted by global expert go to the ranks owning them.

    ``counts`` (E,) rows this rank has for each global expert; rank j owns experts ``[j * n_local, (j+1) * n_local)``.
    The counts travel first (an equal-split all-to-all of E integers), so each rank knows its split sizes:
    ``received[s, e]`` rows arrive from rank s for local expert e. Rows land grouped by source rank, and are
    regrouped by local expert (source rank order within an expert) for the grouped matmuls; ``receive``
    undoes both steps.
    """

    def __init__(self, counts: torch.Tensor, n_local: int, group: dist.ProcessGroup) -> None:
        self.group = group
        ep = counts.numel() // n_local
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)
        received = received.view(ep, n_local)  # (EP source ranks, local experts)
        self.send_splits = counts.view(ep, n_local).sum(dim=1).tolist()
        self.recv_splits = received.sum(dim=1).tolist()
        self.local_sizes = received.sum(dim=0).tolist()
        # Blocks (source s, expert e) of received rows, in both layouts: row r of block b in the expert-grouped
        # layout is row by_expert[r] = source_start[b] + (r - block_start[b]) of the source-grouped one.
        flat = received.flatten()  # (EP * n_local,) block sizes, source-major
        source_start = (flat.cumsum(0) - flat).view(ep, n_local).t().flatten()  # (n_local * EP,) expert-major
        sizes = received.t().flatten()  # (n_local * EP,) block sizes, expert-major
        block_start = sizes.cumsum(0) - sizes
        n = sum(self.local_sizes)
        position = torch.arange(n, device=counts.device)  # (R,)
        self.by_expert = torch.repeat_interleave(source_start - block_start, sizes, output_size=n) + position
        self.by_source = torch.empty_like(position).scatter_(0, self.by_expert, position)  # the inverse permutation

    def send(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows (T*k, D) in global expert order -> the rows for its own experts (R, D), expert-grouped."""
        return _AllToAllV.apply(rows, self.group, self.recv_splits, self.send_splits).index_select(0, self.by_expert)

    def receive(self, out: torch.Tensor) -> torch.Tensor:
        """Expert outputs (R, D), expert-grouped -> this rank's rows (T*k, D) back in global expert order."""
        return _AllToAllV.apply(out.index_select(0, self.by_source), self.group, self.send_splits, self.recv_splits)


def parallelize_experts(model: nn.Module, ep_size: int, ep_rank: int | None = None) -> nn.Module:
    """Swap every MoE layer's local experts for this rank's expert-parallel slice, in place; returns ``model``.

    Call on every rank before making optimizer groups: on a model built from the same seed on every rank
    (the slices are copied from identical full weights), or on one built on the meta device, which
    ``parallel.materialize`` then fills with this rank's experts only. ``ep_rank``: this process's rank in
    its expert-parallel group when None. Layers already swapped and models without MoE layers are left as
    they are.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, LocalExperts)]
    if not layers:
        return model
    ep_rank = expert_parallel_rank(ep_size) if ep_rank is None else ep_rank
    for layer in layers:
        if layer.num_experts % ep_size:
            raise ValueError(f"num_experts ({layer.num_experts}) must be divisible by parallel.expert ({ep_size})")
        layer.experts = build_expert_parallel(layer, ep_size, ep_rank)
    return model


def pipeline_moe_metrics(stage: nn.Module, num_experts: int, dropless: bool, pipe_group: dist.ProcessGroup
                         ) -> dict[str, float]:
    """``LanguageModel.moe_metrics`` for a pipeline: this stage's MoE layers summed with every other stage's.

    A collective over the pipeline group, so every stage returns the same keys (a stage without MoE layers
    adds zeros), as the training loop's data-parallel average needs.
    """
    routed = [m.last for m in stage.modules() if isinstance(m, MoE) and m.last is not None]
    device = next(stage.parameters()).device  # NCCL reduces device tensors only
    # aux, z, dropped, imbalance, layers, then tokens per expert (E,)
    totals = torch.zeros(5 + num_experts, dtype=torch.float64, device=device)
    for r in routed:
        one = torch.ones((), device=r.aux_loss.device)
        totals += torch.cat([torch.stack([r.aux_loss.detach(), r.z_loss.detach(), r.dropped_fraction, r.imbalance,
                                          one]), r.tokens_per_expert]).to(device, torch.float64)
    dist.all_reduce(totals, group=pipe_group)
    aux, z, dropped, imbalance, layers = totals[:5].tolist()
    tokens = totals[5:]
    if not layers:
        return {}
    load = tokens / tokens.mean().clamp(min=1e-9)
    out = {"moe_aux_loss": aux, "moe_z_loss": z, "moe_imbalance": imbalance / layers,
           "moe_load_max": load.max().item(), "moe_load_min": load.min().item()}
    if not dropless:
        out["moe_dropped_fraction"] = dropped / layers
    if num_experts <= 16:
        out.update({f"moe_tokens_expert_{e}": n for e, n in enumerate(tokens.tolist())})
    return out
