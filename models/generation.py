"""Autoregressive sampling from a LanguageModel with its recurrent state (H3 state, attention KV cache).

The prompt is prefilled in one parallel pass per layer (each mixer's ``prefill`` builds its state from
the whole prompt), then tokens are decoded one ``step`` at a time, so a token costs O(1) in H3 layers
and O(position) in attention layers instead of a full forward over the sequence.

`DecodingState` is the decoding core: `generate` here and the Hugging Face model
(``models/hf/modeling_hybrid_lm.py``) both prefill and step through it, so they compute every row with
the same operations and agree token for token. Prompts of different lengths are grouped by length (see
its docstring); each row's state only ever sees its own tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hybrid_pretrain.models.packed_linear import PackedLinears, packing_helps


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


@dataclass
class RowGroup:
    """Rows of a batch whose prompts have the same length: decoded as one batch with their own state."""

    rows: torch.Tensor  # (b,) indices into the batch, ascending
    length: int  # their prompt length
    state: list  # LanguageModel.allocate_state(b, ...): one entry per block


class DecodingState:
    """The decoding core shared by `generate` and the Hugging Face model: prefill once, then one token per row per step.

    Schedule: the rows are grouped by prompt length; each group is prefilled with its whole prompt and
    then stepped as one batch, with a recurrent state of its own. Why this one:

    - A row goes through the same operations whatever else is in the batch: no padding enters a state,
      rows of different lengths never share one, and a row alone gets the same prefill and steps. That makes
      `generate` and transformers' ``generate`` agree token for token: both drive this class, and a
      different schedule (e.g. an FFT prefill of 12 tokens vs. a prefill of 5 and 7 steps) differs by
      rounding, enough to flip a greedy argmax. transformers' loop needs every row's next-token logits
      after its first forward, so the former schedule (prefill the shortest prompt, then feed the longer
      rows their prompt while the others already sample) cannot run inside it.
    - No mixer changes: the KV caches, rotary offsets and the other mixers' integer ``pos`` stay one per
      state, so every mixer that decodes decodes here as is. The alternative, per-row positions in every
      attention-like state plus a masked catch-up, changes many mixers.
    - Equal-length prompts (the common and benchmarked case) are one group: one prefill and one ``step``
      call per token, as before. A ragged batch costs one ``step`` call per distinct length per token.

    One coupling stays, and it is the model's own: an MoE layer with a capacity limit may drop tokens
    depending on the other tokens of its batch, here as in training.
    """

    def __init__(self, model: nn.Module, lengths: torch.Tensor, max_len: int) -> None:
        """`lengths` (B,): each row's prompt length; `max_len`: positions a row may reach (prompt + new tokens)."""
        self.model = model
        self.batch_size = len(lengths)
        self.groups: list[RowGroup] = []
        for n in lengths.unique().tolist():  # ascending
            rows = (lengths == n).nonzero().squeeze(1)  # (b,)
            self.groups.append(RowGroup(rows, n, model.allocate_state(len(rows), max_len, device=lengths.device)))
        # one group (equal prompt lengths): its steps' matmuls through weights packed once (models/packed_linear.py)
        one = len(self.groups) == 1 and packing_helps(model, self.batch_size)
        self.packed = PackedLinears(model, self.batch_size) if one else None

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """prompt_ids (B, L), row b's prompt in its first lengths[b] positions -> next-token logits (B, V).

        What depends on the weights alone (an SSM's discretisation, kernel, step constants) is computed once
        and kept by the layers themselves while autograd is off (``DiagonalSSM._inference_cache``)."""
        return self._merge([prefill(self.model, self._rows(prompt_ids, g)[:, : g.length], g.state)
                            for g in self.groups])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,): every row's next token -> logits (B, V) for the token after it."""
        with self.packed.active() if self.packed is not None else contextlib.nullcontext():
            return self._merge([self.model.step(self._rows(tokens, g), g.state) for g in self.groups])

    def _rows(self, t: torch.Tensor, group: RowGroup) -> torch.Tensor:
        """Group `group`'s rows of the batch tensor `t` (all of it when there is one group)."""
        return t if len(self.groups) == 1 else t[group.rows]

    def _merge(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """One (b, V) output per group -> (B, V) in batch order."""
        if len(outputs) == 1:
            return outputs[0]
        merged = outputs[0].new_empty(self.batch_size, outputs[0].shape[-1])  # (B, V)
        for group, out in zip(self.groups, outputs):
            merged[group.rows] = out
        return merged


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
    """Continue each prompt by `max_new_tokens` tokens (prefill, then recurrent steps, via `DecodingState`).

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
    longest = int(lengths.max())
    in_prompt = torch.arange(longest, device=device) < lengths.unsqueeze(1)  # (B, longest)
    out = torch.full((B, longest + max_new_tokens), pad_id, dtype=torch.long, device=device)
    out[:, :longest] = torch.where(in_prompt, prompt_ids[:, :longest], pad_id)
    rows = torch.arange(B, device=device)

    with eval_mode(model):
        decoding = DecodingState(model, lengths, max_len=longest + max_new_tokens)
        logits = decoding.prefill(prompt_ids)  # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, sampling, generator)
            out[rows, lengths + i] = torch.where(done, pad_id, nxt)
            feed = torch.where(done, 0, nxt)  # a stopped row's state no longer matters; pad_id may be no token
            if eos_id is not None:
                done |= nxt == eos_id
            if i + 1 == max_new_tokens or done.all():
                break
            logits = decoding.step(feed)
    return out
