"""Expert parallelism: each rank of an expert-parallel group keeps ``num_experts / EP`` experts of every MoE layer.

Choice of machinery, and why:
- Token exchange is ``torch.distributed.all_to_all_single`` (native on gloo and NCCL) in a small
  autograd function, around our own router's dense (E, C, D) slots. DeepSpeed's ``MOELayer`` only runs
  its own ``TopKGate`` internals, and megatron-core's dispatcher needs CUDA streams.
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

from hybrid_pretrain.models.ffn.moe import LocalExperts, MoE, combine, dispatch
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

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by the engine; our groups were made in parallel.groups.initialize."""
            self.group = expert_parallel_group(self.ep_size)

    return ExpertParallelExperts


class _UnusedGate(nn.Module):
    """Stands in for DeepSpeed's TopKGate, which our router replaces (it would add an unused weight)."""

    def _set_ep_group(self, group: object) -> None:
        pass


def build_expert_parallel(layer: MoE, ep_size: int, ep_rank: int) -> nn.Module:
    """A container holding experts ``[ep_rank * E/EP, (ep_rank + 1) * E/EP)`` of ``layer``, copied by value."""
    n_local = layer.num_experts // ep_size
    template = layer.experts.mlps[0]
    # DeepSpeed deep-copies the template per local expert and marks each parameter allreduce=False.
    container = _container_class()(hidden_size=template.w_out.shape[0], expert=template,
                                      num_experts=layer.num_experts, ep_size=ep_size, k=layer.top_k)
    container.deepspeed_moe.gate = _UnusedGate()
    container.group = expert_parallel_group(ep_size)
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


def parallelize_experts(model: nn.Module, ep_size: int) -> nn.Module:
    """Swap every MoE layer's local experts for this rank's expert-parallel slice, in place; returns ``model``.

    Call on every rank after building the model from the same seed, or after loading the single-rank
    weights into a tensor slice / pipeline stage (so the slices come from identical full weights), and
    before making optimizer groups. Layers already swapped and models without MoE layers are left as they are.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, LocalExperts)]
    if not layers:
        return model
    ep_rank = expert_parallel_rank(ep_size)
    for layer in layers:
        if layer.num_experts % ep_size:
            raise ValueError(f"num_experts ({layer.num_experts}) must be divisible by parallel.expert ({ep_size})")
        layer.experts = build_expert_parallel(layer, ep_size, ep_rank)
    return model


def pipeline_moe_metrics(stage: nn.Module, num_experts: int, pipe_group: dist.ProcessGroup) -> dict[str, float]:
    """``LanguageModel.moe_metrics`` for a pipeline: this stage's MoE layers summed with every other stage's.

    A collective over the pipeline group, so every stage returns the same keys (a stage without MoE layers
    adds zeros), as the training loop's data-parallel average needs.
    """
    routed = [m.last for m in stage.modules() if isinstance(m, MoE) and m.last is not None]
    device = next(stage.parameters()).device  # NCCL reduces device tensors only
    totals = torch.zeros(4 + num_experts, dtype=torch.float64, device=device)  # aux, z, dropped, layers, tokens (E,)
    for r in routed:
        one = torch.ones((), device=r.aux_loss.device)
        totals += torch.cat([torch.stack([r.aux_loss.detach(), r.z_loss.detach(), r.dropped_fraction, one]),
                             r.tokens_per_expert]).to(device, torch.float64)
    dist.all_reduce(totals, group=pipe_group)
    aux, z, dropped, layers = totals[:4].tolist()
    tokens = totals[4:]
    if not layers:
        return {}
    load = tokens / tokens.mean().clamp(min=1e-9)
    out = {"moe_aux_loss": aux, "moe_z_loss": z, "moe_dropped_fraction": dropped / layers,
           "moe_load_max": load.max().item(), "moe_load_min": load.min().item()}
    if num_experts <= 16:
        out.update({f"moe_tokens_expert_{e}": n for e, n in enumerate(tokens.tolist())})
    return out
