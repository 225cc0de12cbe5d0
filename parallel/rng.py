"""Dropout under tensor parallelism: each tensor rank draws its own masks where it holds its own slice.

Replicated activations (the residual stream without sequence parallelism) must see the same dropout
mask on every tensor rank, or the ranks' copies drift apart; activations split across tensor ranks
(attention heads, and under sequence parallelism the residual stream's positions) need independent
masks per rank, or every slice repeats the others' pattern. Megatron keeps a second, per-rank CUDA
generator for the split regions (its ``CudaRNGStatesTracker``, CUDA-only, and it must be saved with
checkpoints and re-forked in activation recomputation). Here the split region's stream is derived
instead: entering it draws one seed from the default generator (the same draw on every tensor rank,
so the default stream stays in step across them), and the region runs on ``seed`` offset by the
tensor rank, after which the default generator's state is put back. Everything follows from the
default generator, so activation checkpointing (which restores it before recomputing) replays the
same masks, a checkpoint's saved RNG state resumes them exactly, and CPU and GPU work alike.

``parallel.build`` applies it: attention mixers run under ``split_rng`` whenever T > 1, and under
sequence parallelism the residual and embedding ``nn.Dropout`` modules become ``SplitDropout``.
At T = 1 nothing changes, so single-rank runs draw exactly as before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from hybrid_pretrain.models.mixers.attention import Attention

_RANK_OFFSET = 2718  # as megatron's tensor-parallel seed offset: seed + 2718 + tensor rank


@contextlib.contextmanager
def split_rng(tp_rank: int, device: torch.device) -> Iterator[None]:
    """Inside: the default generator of ``device`` (and the CPU's) draws this tensor rank's own stream."""
    seed = int(torch.randint(0, 2**62, (1,)).item())  # CPU default generator: in step on every tensor rank
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):  # restores the states on exit
        torch.default_generator.manual_seed(seed + _RANK_OFFSET + tp_rank)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed + _RANK_OFFSET + tp_rank)
        yield


class SplitDropout(nn.Dropout):
    """``nn.Dropout`` on a tensor split across tensor ranks: each rank draws its own mask."""

    def __init__(self, p: float, tp_rank: int) -> None:
        super().__init__(p)
        self.tp_rank = tp_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        with split_rng(self.tp_rank, x.device):
            return super().forward(x)


def _split_forward(forward, tp_rank: int):
    @functools.wraps(forward)
    def run(x: torch.Tensor, *args, **kwargs):
        with split_rng(tp_rank, x.device):
            return forward(x, *args, **kwargs)

    return run


def split_dropout_regions(model: nn.Module, tp_rank: int, sequence_parallel: bool) -> nn.Module:
    """Give the split regions of a tensor-parallel ``model`` their per-rank dropout streams (in place).

    Attention mixers (split by heads) run their forward under ``split_rng``; with sequence parallelism
    every ``nn.Dropout`` outside them (residual branches, embedding) acts on this rank's positions and
    becomes a ``SplitDropout``. Models without dropout are left as they are.
    """

    for module in list(model.modules()):
        if isinstance(module, Attention) and module.dropout > 0:
            module.forward = _split_forward(module.forward, tp_rank)
        if sequence_parallel:
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Dropout and child.p > 0:
                    setattr(module, child_name, SplitDropout(child.p, tp_rank))
    return model
