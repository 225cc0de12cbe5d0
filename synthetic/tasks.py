"""Synthetic recall tasks from the H3 paper (Fu et al. 2023, Sec. 3.1), after Olsson et al. and Ba et al.

Each example is a sequence of `seq_len` tokens whose last token is the answer: a model reads the first
seq_len - 1 tokens and is scored on predicting the last one. Solving either task needs recalling a
token by what stood *next to* it earlier in the sequence, which is what H3's shift SSM plus
multiplicative interaction provides and a plain diagonal SSM (S4D) lacks.

- induction_head: random tokens with one special token somewhere, followed by some token x; the
  sequence ends with the special token again and the answer is x.  ``. . . ⊢ x . . . ⊢ -> x``
- associative_recall: key-value pairs (keys from the lower half of the vocabulary, values from the
  upper half, each key bound to one value per sequence), then a key seen before; the answer is its
  value.  ``a 2 c 4 b 3 ... c -> 4``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SyntheticData:
    """inputs (N, seq_len - 1) token ids and targets (N,): the token that follows each input."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.targets.shape[0]


def induction_head(n: int, vocab: int, seq_len: int, generator: torch.Generator) -> SyntheticData:
    """Special token vocab-1; content tokens 0..vocab-2. The first special token sits anywhere that leaves
    its follower inside the input and apart from the final special token."""
    if vocab < 3 or seq_len < 5:
        raise ValueError(f"induction_head needs --vocab >= 3 and --seq-len >= 5, got {vocab} and {seq_len}")
    special, L = vocab - 1, seq_len - 1
    inputs = torch.randint(0, vocab - 1, (n, L), generator=generator)  # (N, L) content tokens only
    where = torch.randint(0, L - 3, (n,), generator=generator)  # first special at where, x at where + 1 <= L - 3
    rows = torch.arange(n)
    inputs[rows, where] = special
    inputs[:, -1] = special
    return SyntheticData(inputs, inputs[rows, where + 1].clone())


def associative_recall(n: int, vocab: int, seq_len: int, generator: torch.Generator) -> SyntheticData:
    """(seq_len - 2) / 2 key-value pairs, then a query key that occurred among them; the answer is its value."""
    if vocab < 4 or vocab % 2 or seq_len < 4 or seq_len % 2:
        raise ValueError(
            f"associative_recall needs an even --vocab >= 4 and an even --seq-len >= 4 (pairs + query + answer), "
            f"got {vocab} and {seq_len}"
        )
    n_keys, pairs = vocab // 2, (seq_len - 2) // 2
    binding = torch.randint(n_keys, vocab, (n, n_keys), generator=generator)  # (N, K) each key's value
    keys = torch.randint(0, n_keys, (n, pairs), generator=generator)  # (N, P), keys may repeat
    values = torch.gather(binding, 1, keys)  # (N, P)
    query = torch.gather(keys, 1, torch.randint(0, pairs, (n, 1), generator=generator))  # (N, 1) a key that occurred
    inputs = torch.cat([torch.stack([keys, values], dim=-1).flatten(1), query], dim=1)  # (N, 2P + 1)
    return SyntheticData(inputs, torch.gather(binding, 1, query).squeeze(1))


TASKS: dict[str, Callable[[int, int, int, torch.Generator], SyntheticData]] = {
    "induction_head": induction_head,
    "associative_recall": associative_recall,
}


def make_task(task: str, n: int, vocab: int, seq_len: int, seed: int) -> SyntheticData:
    """`n` examples of `task`, reproducible from `seed`."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
    return TASKS[task](n, vocab, seq_len, torch.Generator().manual_seed(seed))
