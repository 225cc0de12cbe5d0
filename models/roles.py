"""Roles a layer declares; what each role becomes is decided by the backend that `parallel/` installs.

A model says "this projection's outputs may be split across tensor-parallel ranks" (``column_linear``),
"its inputs are split" (``row_linear``), "every rank holds it whole" (``replicated_linear``), and names
the model boundaries (embedding, norm between parallel regions, tied head, loss). Models import only
this module, so they never depend on ``parallel/`` (the package graph runs base -> kernels -> models ->
parallel): at tensor-parallel size 1, with no backend installed, each role is the plain torch layer,
bit-identical to a model that never heard of parallelism. ``parallel.roles.install()`` swaps in the
tensor/sequence-parallel implementations (megatron-core layers, vocab-parallel embedding and loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.kernels.channel_major import linear_from_channel_major, linear_to_channel_major, swap_last_two

IGNORE_INDEX = -100  # labels with this value add nothing to the loss


class SingleRank:
    """Every role as a plain torch layer: the model as it runs on one rank."""

    def column_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row_linear(self, in_features: int, out_features: int, bias: bool = True, stride: int = 1) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def replicated_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def shared_input(self, x: torch.Tensor, projections: list[nn.Module]) -> list[torch.Tensor]:
        return [p(x) for p in projections]

    def channel_major_inputs(self, x: torch.Tensor, projections: list[nn.Module]) -> list[torch.Tensor]:
        if all(type(p) is nn.Linear for p in projections):  # computed transposed, no copy (kernels.channel_major)
            return linear_to_channel_major(x, [p.weight for p in projections], [p.bias for p in projections])
        return [swap_last_two(y) for y in self.shared_input(x, projections)]

    def channel_major_output(self, y: torch.Tensor, projection: nn.Module) -> torch.Tensor:
        if type(projection) is nn.Linear:
            return linear_from_channel_major(y, projection.weight, projection.bias)
        return projection(swap_last_two(y))

    def local_size(self, n: int, what: str) -> int:
        return n

    def mark_sharded(self, module: nn.Module, dim: int = 0) -> nn.Module:
        return module

    def layer_norm(self, d_model: int, eps: float) -> nn.Module:
        return nn.LayerNorm(d_model, eps=eps)

    def vocab_embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        return nn.Embedding(vocab_size, d_model)

    def tied_logits(self, h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, embedding_weight)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


_backend: SingleRank = SingleRank()


def install(backend: SingleRank) -> None:
    """Make ``backend`` decide what the roles become for every layer built (and boundary run) after this."""
    global _backend
    _backend = backend


def installed() -> SingleRank:
    return _backend


def column_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection whose output features may be split across tensor-parallel ranks (QKV, MLP up)."""
    return _backend.column_linear(in_features, out_features, bias)


def row_linear(in_features: int, out_features: int, bias: bool = True, stride: int = 1) -> nn.Module:
    """A projection whose input features may be split (attention out, MLP down); ``stride``: interleaved slices."""
    return _backend.row_linear(in_features, out_features, bias, stride)


def replicated_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """A projection every rank holds whole (small or routing layers)."""
    return _backend.replicated_linear(in_features, out_features, bias)


def shared_input(x: torch.Tensor, projections: list[nn.Module]) -> list[torch.Tensor]:
    """``[p(x) for p in projections]`` for column projections that read the same x (H3's q, k and v)."""
    return _backend.shared_input(x, projections)


def channel_major_inputs(x: torch.Tensor, projections: list[nn.Module]) -> list[torch.Tensor]:
    """``shared_input`` with each output channel-major: x (B, L, D) -> [(B, D_i, L)], for convolution mixers.

    Plain linear layers are computed transposed straight into (D_i, B, L) storage; any other projection
    (tensor-parallel layers) runs as itself and its output is copied over (``kernels.channel_major``).
    """
    return _backend.channel_major_inputs(x, projections)


def channel_major_output(y: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """``projection(y.transpose(1, 2))`` for channel-major y (B, D, L) -> (B, L, D_out), without a layout copy
    for a plain linear layer."""
    return _backend.channel_major_output(y, projection)


def local_size(n: int, what: str) -> int:
    """This rank's share of ``n`` features split across tensor-parallel ranks; ``what`` names them in errors."""
    return _backend.local_size(n, what)


def mark_sharded(module: nn.Module, dim: int = 0) -> nn.Module:
    """Declare every parameter of ``module`` split along ``dim`` across tensor-parallel ranks."""
    return _backend.mark_sharded(module, dim)


def layer_norm(d_model: int, eps: float) -> nn.Module:
    """The norm between tensor-parallel regions (per-position; sequence parallelism splits its positions)."""
    return _backend.layer_norm(d_model, eps)


def vocab_embedding(vocab_size: int, d_model: int) -> nn.Module:
    """Token embedding (B, L) -> (B, L, D); its rows may be split across tensor-parallel ranks."""
    return _backend.vocab_embedding(vocab_size, d_model)


def tied_logits(h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """h (..., D) -> logits (..., V) against the embedding matrix (this rank's V / TP rows when split)."""
    return _backend.tied_logits(h, embedding_weight)


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the head returned them -> (..., V) on every rank (for callers that want logits, not a loss)."""
    return _backend.full_logits(logits)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean fp32 cross-entropy of logits (B, L, V or V / TP) against labels (B, L), skipping IGNORE_INDEX."""
    return _backend.cross_entropy(logits, labels)
