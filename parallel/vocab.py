"""The vocabulary under tensor parallelism: embedding rows, the (tied) output head and the loss.

At TP=1 these are ``nn.Embedding``, ``F.linear`` with the embedding matrix and ``F.cross_entropy``,
exactly as a single-rank model computes them. At TP > 1 each rank holds ``V / TP`` rows of the
embedding (megatron-core's ``VocabParallelEmbedding``), computes logits for those rows only and
megatron-core's ``vocab_parallel_cross_entropy`` reduces max and sum-exp across ranks, so the
(B, L, V) logits are never gathered in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor import tensor_parallel_group, tensor_parallel_size

IGNORE_INDEX = -100


def vocab_embedding(vocab_size: int, d_model: int) -> nn.Module:
    """Token embedding (V, D); at TP > 1 this rank's contiguous V / TP rows."""
    if tensor_parallel_size() == 1:
        return nn.Embedding(vocab_size, d_model)
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from parallel.linear import _init, _megatron_config

    return VocabParallelEmbedding(vocab_size, d_model, init_method=_init, config=_megatron_config())


def tied_logits(h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """h (..., D) -> logits (..., V / TP) against this rank's embedding rows (the tied head)."""
    if tensor_parallel_size() > 1:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        h = copy_to_tensor_model_parallel_region(h, group=tensor_parallel_group())  # backward: all-reduce dh
    return F.linear(h, embedding_weight)


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V / TP) -> (..., V) on every rank (for callers that want logits, not a loss)."""
    if tensor_parallel_size() == 1:
        return logits
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits, group=tensor_parallel_group())


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean fp32 cross-entropy of logits (B, L, V / TP) against labels (B, L), skipping label -100."""
    if tensor_parallel_size() == 1:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    keep = labels != IGNORE_INDEX
    per_token = vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~keep, 0))  # (B, L)
    return (per_token * keep).sum() / keep.sum()
