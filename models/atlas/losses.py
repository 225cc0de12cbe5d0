"""Atlas's four retriever losses (Izacard et al. 2022, section 2.2): the reader teaches the retriever.

Each compares the retriever's distribution over the K retrieved passages,
``p_retr(d_k) = softmax_k(s(q, d_k) / temperature)``, with a target built from the reader, which is held
fixed (no gradient flows into the reader from these losses):

- attention distillation (ADist): ``softmax_k(a_k / target_temperature)``, a_k the share of the reader's
  cross-attention that passage k receives;
- EMDR²: the passages as a latent variable, ``-log sum_k p_retr(d_k) p_LM(a | q, d_k)``;
- perplexity distillation (PDist, Atlas's default): ``softmax_k(log p_LM(a | q, d_k) / target_temperature)``;
- leave-one-out perplexity distillation (LOOP): ``softmax_k(-log p_LM(a | q, D without d_k) / target_temperature)``,
  so a passage whose removal hurts the answer most gets the most weight.

Atlas (its ``temperature_gold``) feeds PDist and LOOP the mean log-likelihood per answer token and
sharpens the target with a small temperature. That matters most early in training: a reader that barely
prefers the passage holding the answer gives a near-uniform target at temperature 1, and matching a
uniform target is what a collapsed retriever does (all scores equal); a sharp target turns the same
small preference into a clear one.

All take per-query tensors of shape (B, K) and return a scalar averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RETRIEVER_LOSSES = ("adist", "emdr2", "pdist", "loop")


def retriever_log_probs(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """scores (B, K) query-passage inner products -> log p_retr (B, K)."""
    return F.log_softmax(scores.float() / temperature, dim=-1)


def _kl_to_retriever(target_logits: torch.Tensor, scores: torch.Tensor, temperature: float,
                     target_temperature: float) -> torch.Tensor:
    """mean_b KL(softmax(target_logits / target_temperature) || p_retr): gradients reach only the scores."""
    target = F.softmax(target_logits.detach().float() / target_temperature, dim=-1)  # (B, K)
    log_retr = retriever_log_probs(scores, temperature)
    return (target * (torch.log(target.clamp_min(1e-30)) - log_retr)).sum(-1).mean()


def attention_distillation(attention_share: torch.Tensor, scores: torch.Tensor, temperature: float,
                           target_temperature: float = 1.0) -> torch.Tensor:
    """attention_share (B, K): each passage's share of the reader's aggregated cross-attention (see `FiDReader`)."""
    return _kl_to_retriever(attention_share, scores, temperature, target_temperature)


def emdr2(answer_log_likelihood: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """answer_log_likelihood (B, K): log p_LM(a | q, d_k), the reader seeing passage k alone."""
    joint = answer_log_likelihood.detach().float() + retriever_log_probs(scores, temperature)  # (B, K)
    return -torch.logsumexp(joint, dim=-1).mean()


def perplexity_distillation(answer_log_likelihood: torch.Tensor, scores: torch.Tensor, temperature: float,
                            target_temperature: float = 1.0) -> torch.Tensor:
    """answer_log_likelihood (B, K): log p_LM(a | q, d_k) per answer token, the reader seeing passage k alone."""
    return _kl_to_retriever(answer_log_likelihood, scores, temperature, target_temperature)


def leave_one_out_distillation(loo_log_likelihood: torch.Tensor, scores: torch.Tensor, temperature: float,
                               target_temperature: float = 1.0) -> torch.Tensor:
    """loo_log_likelihood (B, K): log p_LM(a | q, all passages but d_k) per answer token."""
    return _kl_to_retriever(-loo_log_likelihood, scores, temperature, target_temperature)
