"""The vocabulary under tensor parallelism: embedding rows, the (tied) output head and the loss.

At TP=1 these are ``nn.Embedding``, ``F.linear`` with the embedding matrix and ``F.cross_entropy``,
exactly as a single-rank model computes them. At TP > 1 each rank holds ``V / TP`` rows of the
embedding (megatron-core's ``VocabParallelEmbedding``), computes logits for those rows only and
megatron-core's ``vocab_parallel_cross_entropy`` reduces max and sum-exp across ranks, so the
(B, L, V) logits are never gathered in training.

Under sequence parallelism (``parallel.sequence``) the embedding reduce-scatters its per-rank lookups to
this rank's positions (B, L / TP, D) instead of all-reducing them, and the tied head gathers the
positions back (its backward reduce-scatters), so the logits and the loss cover the whole sequence
on every tensor rank exactly as without it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.models.roles import IGNORE_INDEX
from hybrid_pretrain.parallel import sequence
from hybrid_pretrain.parallel.linear import _init, _megatron_config
from hybrid_pretrain.parallel.tensor import tensor_parallel_group, tensor_parallel_size


def vocab_embedding(vocab_size: int, d_model: int) -> nn.Module:
    """Token embedding (V, D); at TP > 1 this rank's contiguous V / TP rows.

    Under sequence parallelism it maps (B, L) ids to this rank's positions (B, L / TP, D).
    """
    if tensor_parallel_size() == 1:
        return nn.Embedding(vocab_size, d_model)
    # optional: megatron-core only at tensor-parallel size > 1
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    cls = _sequence_parallel_embedding() if sequence.is_enabled() else VocabParallelEmbedding
    return cls(vocab_size, d_model, init_method=_init, config=_megatron_config())


@functools.cache
def _sequence_parallel_embedding() -> type[nn.Module]:
    """VocabParallelEmbedding whose output is reduce-scattered along our batch-first sequence dim.

    Hand-written because megatron's ``reduce_scatter_embeddings=True`` returns sequence-first activations
    and allocates its output on CUDA; the lookup below is megatron's, written out.
    """
    # optional: megatron-core only at tensor-parallel size > 1
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    class SequenceParallelEmbedding(VocabParallelEmbedding):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if input_ids.dim() != 2:
                raise ValueError(f"a sequence-parallel embedding reads (B, L) token ids, got shape "
                                 f"{tuple(input_ids.shape)} (decode with the consolidated single-rank model)")
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)  # other ranks' rows
            local = F.embedding((input_ids - self.vocab_start_index).masked_fill(outside, 0), self.weight)
            local = local.masked_fill(outside.unsqueeze(-1), 0.0)  # (B, L, D): this rank's rows only
            return sequence.reduce_scatter(local)  # (B, L / TP, D), summed over the ranks' vocabulary slices

    return SequenceParallelEmbedding


def tied_logits(h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """h (..., D) -> logits (..., V / TP) against this rank's embedding rows (the tied head)."""
    if sequence.is_enabled():
        return sequence.gathered_linear(h, embedding_weight)  # (B, L / TP, D) -> (B, L, V / TP)
    if tensor_parallel_size() > 1:
        # optional: megatron-core only at tensor-parallel size > 1
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        h = copy_to_tensor_model_parallel_region(h, group=tensor_parallel_group())  # backward: all-reduce dh
    return F.linear(h, embedding_weight)


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V / TP) -> (..., V) on every rank (for callers that want logits, not a loss)."""
    if tensor_parallel_size() == 1:
        return logits
    # optional: megatron-core only at tensor-parallel size > 1
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits, group=tensor_parallel_group())


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean fp32 cross-entropy of logits (B, L, V / TP) against labels (B, L), skipping label -100."""
    if tensor_parallel_size() == 1:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    # optional: megatron-core only at tensor-parallel size > 1
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    keep = labels != IGNORE_INDEX
    per_token = vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~keep, 0))  # (B, L)
    return (per_token * keep).sum() / keep.sum()
