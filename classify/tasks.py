"""Sequence classification tasks: a generated ListOps and scikit-learn's handwritten digits.

- listops (Nangia & Bowman 2018, as in Long Range Arena): nested prefix expressions over digits, e.g.
  ``[MAX 2 9 [MIN 4 7 ] 0 ]`` -> 9. Operators MAX, MIN, MED (the lower median) and SM (sum modulo 10);
  answers 0-9. Solving it needs the whole bracket structure, so it exercises long-range mixing.
- digits: scikit-learn's ``load_digits`` (1,797 8x8 grey images, 17 grey levels), flattened row by row into
  64-pixel sequences (sequential MNIST in miniature); pixels are tokens 0-16 or values in [0, 1], and the
  images themselves (1, 8, 8) feed the ViT. The train/test split is fixed by the seed and stratified.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

PAD = 0
DIGIT_TOKENS = [str(d) for d in range(10)]
OPERATORS = ["[MAX", "[MIN", "[MED", "[SM"]
LISTOPS_VOCAB = ["<pad>", *DIGIT_TOKENS, *OPERATORS, "]"]  # token id = index; 16 tokens
TOKEN_ID = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
DIGITS_LEVELS = 17  # load_digits pixels are integers 0..16
TASKS = ("listops", "digits")


@dataclass
class ClassificationData:
    """inputs: (N, L) token ids (long), (N, L) values (float) or (N, C, H, W) images; mask (N, L) True on real
    positions (padding is on the right); targets (N,) class ids."""

    inputs: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    vocab_size: int  # token ids are < vocab_size (0 for values and images)
    num_classes: int

    def __len__(self) -> int:
        return self.targets.shape[0]


def apply_op(op: str, args: list[int]) -> int:
    """The value of one ListOps operator applied to its evaluated arguments."""
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        return sorted(args)[(len(args) - 1) // 2]
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator '{op}'")


def _expression(rng: np.random.Generator, depth: int, max_depth: int, max_args: int) -> tuple[list[str], int]:
    """One random expression: (tokens, value). Deeper levels are ever more likely to be plain digits."""
    if depth >= max_depth or (depth > 0 and rng.random() < 0.25 + 0.15 * depth):
        d = int(rng.integers(10))
        return [str(d)], d
    op = OPERATORS[int(rng.integers(len(OPERATORS)))]
    tokens, values = [op], []
    for _ in range(int(rng.integers(2, max_args + 1))):
        sub, value = _expression(rng, depth + 1, max_depth, max_args)
        tokens += sub
        values.append(value)
    return tokens + ["]"], apply_op(op, values)


def listops(n: int, seed: int, max_len: int = 200, max_depth: int = 4, max_args: int = 5) -> ClassificationData:
    """`n` expressions of at most `max_len` tokens (longer draws are redrawn), right-padded with <pad>."""
    if max_len < 5 or max_depth < 1 or max_args < 2:
        raise ValueError(
            f"listops needs max_len >= 5, max_depth >= 1 and max_args >= 2, got {max_len}, {max_depth}, {max_args}"
        )
    rng = np.random.default_rng(seed)
    inputs = torch.full((n, max_len), PAD, dtype=torch.long)
    targets = torch.empty(n, dtype=torch.long)
    for i in range(n):
        while True:
            tokens, value = _expression(rng, 0, max_depth, max_args)
            if len(tokens) <= max_len:
                break
        inputs[i, : len(tokens)] = torch.tensor([TOKEN_ID[t] for t in tokens])
        targets[i] = value
    return ClassificationData(inputs, inputs != PAD, targets, len(LISTOPS_VOCAB), 10)


@lru_cache(maxsize=4)
def _digits_split(seed: int, test_fraction: float) -> tuple[np.ndarray, ...]:
    """(x_train, x_test, y_train, y_test), cached: reading the data set costs more than any use of it here."""
    from sklearn.datasets import load_digits  # optional: scikit-learn only for the digits task
    from sklearn.model_selection import train_test_split  # optional: scikit-learn only for the digits task

    bunch = load_digits()
    return tuple(train_test_split(bunch.data, bunch.target, test_size=test_fraction, random_state=seed,
                                  stratify=bunch.target))


def digits(split: str, seed: int, as_: str = "tokens", test_fraction: float = 0.25) -> ClassificationData:
    """The `split` ("train" or "test") of load_digits as pixel sequences (`as_` "tokens" or "values") or images."""
    if split not in ("train", "test") or as_ not in ("tokens", "values", "images"):
        raise ValueError(f"digits: split must be train|test and as_ tokens|values|images, got '{split}', '{as_}'")
    x_train, x_test, y_train, y_test = _digits_split(seed, test_fraction)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    x = torch.from_numpy(np.ascontiguousarray(x))  # (N, 64), integer levels 0..16 as float64
    mask = torch.ones(x.shape, dtype=torch.bool)
    if as_ == "tokens":
        return ClassificationData(x.long(), mask, torch.from_numpy(y).long(), DIGITS_LEVELS, 10)
    values = (x / (DIGITS_LEVELS - 1)).float()
    if as_ == "images":
        values = values.view(-1, 1, 8, 8)  # (N, C, H, W), rows as load_digits flattened them
    return ClassificationData(values, mask, torch.from_numpy(y).long(), 0, 10)


def make_task(task: str, split: str, seed: int, **kwargs) -> ClassificationData:
    """One split of a task; ListOps splits are independent streams of the same seed (kwargs: listops' shape
    and ``size``; digits' ``as_``)."""
    if task == "listops":
        size = kwargs.pop("size")
        return listops(size, seed * 2 + (split == "test"), **kwargs)
    if task == "digits":
        return digits(split, seed, **kwargs)
    raise ValueError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
