"""Autoregressive sampling from a LanguageModel with its recurrent state (H3 state, attention KV cache).

The prompt is prefilled in one parallel pass per layer (each mixer's ``prefill`` builds its state from
the whole prompt), then tokens are decoded one ``step`` at a time, so a token costs O(1) in H3 layers
and O(position) in attention layers instead of a full forward over the sequence.

Prompts of different lengths share a batch without padding inside the state: the shortest prompt is
prefilled for every row, then each row keeps being fed its own prompt tokens until they run out
(teacher forcing) and only then samples. Each row's state thus only ever sees its own tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hybrid_pretrain.models.mixers.ssm import DiagonalSSM


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits.

    temperature 0 is greedy (argmax); otherwise logits are divided by it, then restricted to the
    `top_k` most likely tokens (0: all) and to the smallest set whose probability reaches `top_p`
    (nucleus sampling; 1.0: all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling(temperature=0.0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> the same with tokens outside the top-k / top-p set at -inf (the likeliest always stays)."""
    logits = logits.float()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more likely ones before it already reach top_p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # (B, V); position 0 is never dropped
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: nn.Module, input_ids: torch.Tensor, state: list) -> torch.Tensor:
    """Run the prompt (B, L) through the model, filling `state`; returns the last position's logits (B, V).

    Walks the blocks itself (pre-norm residual, as models.block.Block) so that each mixer can build its
    recurrent state from the whole prompt in one pass; a mixer without ``prefill`` steps through it.
    The model must be in eval mode (no dropout), as in `generate`.
    """
    h = model.embedding(input_ids)  # (B, L, D)
    for block, block_state in zip(model.blocks, state):
        x = block.norm1(h)
        if hasattr(block.mixer, "prefill"):
            y = block.mixer.prefill(x, block_state)
        else:
            y = torch.stack([block.mixer.step(x[:, t], block_state) for t in range(x.shape[1])], dim=1)
        h = h + y
        h = h + block.ffn(block.norm2(h))
    return model._logits(h[:, -1])  # (B, V)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while sampling; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def frozen_discretization(model: nn.Module) -> Iterator[None]:
    """Compute every DiagonalSSM's discretisation once for the whole generation instead of at every step.

    The weights do not change while sampling, and recomputing exp/expm1 of the (H, N/2) modes at each
    token was the largest cost of an H3 decoding step on CPU. The cached value shadows the method on
    the instance and is removed on exit.
    """
    ssms = [m for m in model.modules() if isinstance(m, DiagonalSSM)]
    for ssm in ssms:
        cached = ssm.discretize()
        ssm.discretize = lambda cached=cached: cached
    try:
        yield
    finally:
        for ssm in ssms:
            del ssm.discretize


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    prompt_lengths: torch.Tensor | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each prompt by `max_new_tokens` tokens.

    Args:
        prompt_ids: (B, L) token ids; with `prompt_lengths` (B,) row b's prompt is its first
            prompt_lengths[b] tokens (the rest is ignored), otherwise every row is L long.
        eos_id: a row stops after emitting it (the rest of its row is `pad_id`); generation ends
            early once every row has stopped.
        generator: for reproducible sampling.

    Returns:
        (B, max(lengths) + max_new_tokens): row b holds its prompt, then its new tokens, then `pad_id`.
    """
    B, L = prompt_ids.shape
    device = prompt_ids.device
    lengths = torch.full((B,), L, device=device) if prompt_lengths is None else prompt_lengths.to(device)
    if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > L:
        raise ValueError(f"prompt_lengths must be (B,) = ({B},) values in [1, {L}], got {prompt_lengths}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    longest, shortest = int(lengths.max()), int(lengths.min())
    total = longest + max_new_tokens
    out = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    out[:, :longest] = prompt_ids[:, :longest]
    ends = lengths + max_new_tokens  # (B,) exclusive end of each row's tokens

    with eval_mode(model), frozen_discretization(model):
        state = model.allocate_state(B, max_len=total, device=device)
        logits = prefill(model, out[:, :shortest], state)  # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for pos in range(shortest, total):
            in_prompt = pos < lengths  # (B,) rows still reading their prompt
            active = ~in_prompt & (pos < ends) & ~done
            if not active.any() and not in_prompt.any():
                break
            nxt = sample_next(logits, sampling, generator)
            token = torch.where(in_prompt, out[:, pos], torch.where(active, nxt, pad_id))
            out[:, pos] = token
            if eos_id is not None:
                done |= active & (token == eos_id)
            if pos + 1 < total:  # finished rows are fed token 0: their state no longer matters, pad_id may be no token
                logits = model.step(torch.where(in_prompt | active, token, 0), state)
    return out
