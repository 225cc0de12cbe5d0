"""What the roles of ``models.roles`` become under tensor and sequence parallelism.

``install()`` (called by ``parallel.groups.initialize``) hands models' role factories to this backend.
Each role asks megatron-core's groups at build time: at tensor-parallel size 1 (no groups, or inside
``parallel.tensor.single_rank()``) it is still the plain torch layer; at TP > 1 a column projection is
megatron's ``ColumnParallelLinear``, a row projection ``RowParallelLinear``, the embedding
``VocabParallelEmbedding`` and the loss ``vocab_parallel_cross_entropy`` (``parallel.linear``,
``parallel.vocab``), with sequence parallelism's collectives around them where it is on
(``parallel.sequence``).
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid_pretrain.models import roles
from hybrid_pretrain.parallel import linear, sequence, tensor, vocab


class TensorParallelRoles(roles.SingleRank):
    """Roles laid out on megatron-core's tensor-parallel groups (plain layers wherever TP = 1)."""

    def column_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return linear.column_linear(in_features, out_features, bias)

    def row_linear(self, in_features: int, out_features: int, bias: bool = True, stride: int = 1) -> nn.Module:
        return linear.row_linear(in_features, out_features, bias, stride)

    def shared_input(self, x: torch.Tensor, projections: list[nn.Module]) -> list[torch.Tensor]:
        return linear.shared_input(x, projections)

    def local_size(self, n: int, what: str) -> int:
        return tensor.local_size(n, what)

    def mark_sharded(self, module: nn.Module, dim: int = 0) -> nn.Module:
        return tensor.mark_sharded(module, dim)

    def layer_norm(self, d_model: int, eps: float) -> nn.Module:
        return sequence.layer_norm(d_model, eps)

    def vocab_embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        return vocab.vocab_embedding(vocab_size, d_model)

    def tied_logits(self, h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return vocab.tied_logits(h, embedding_weight)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return vocab.full_logits(logits)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab.cross_entropy(logits, labels)


def install() -> None:
    """Route ``models.roles`` through this backend (idempotent)."""
    if not isinstance(roles.installed(), TensorParallelRoles):
        roles.install(TensorParallelRoles())
