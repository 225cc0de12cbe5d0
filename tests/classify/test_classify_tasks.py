"""Classification tasks: ListOps is well formed and its labels match an independent evaluator; digits splits are
fixed by the seed."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.classify.tasks import LISTOPS_VOCAB, PAD, digits, listops, make_task


def evaluate(tokens: list[str]) -> int:
    """Reference ListOps evaluator: a stack machine over the token stream (no recursion, no tree)."""
    stack: list = []
    for tok in tokens:
        if tok.startswith("["):
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            value = {"[MAX": max, "[MIN": min, "[MED": lambda a: sorted(a)[(len(a) - 1) // 2],
                     "[SM": lambda a: sum(a) % 10}[op](args)
            if not stack:
                return value
            stack[-1].append(value)
        else:
            if not stack:
                return int(tok)
            stack[-1].append(int(tok))
    raise AssertionError(f"unbalanced expression {' '.join(tokens)}")


def test_listops_well_formed_and_labels_match_reference() -> None:
    data = listops(300, seed=5, max_len=120, max_depth=4, max_args=5)
    assert data.inputs.shape == (300, 120) and data.vocab_size == len(LISTOPS_VOCAB) == 16
    lengths = data.mask.sum(1)
    assert (lengths <= 120).all() and lengths.max() > 40
    for row, n, label in zip(data.inputs, lengths, data.targets):
        assert (row[n:] == PAD).all() and (row[:n] != PAD).all()  # right padding only
        tokens = [LISTOPS_VOCAB[i] for i in row[:n]]
        assert sum(t.startswith("[") for t in tokens) == tokens.count("]")
        assert evaluate(tokens) == label
    assert len(set(data.targets.tolist())) == 10  # every answer occurs


def test_listops_deterministic_by_seed_and_splits_differ() -> None:
    a, b = make_task("listops", "train", 3, size=50), make_task("listops", "train", 3, size=50)
    test = make_task("listops", "test", 3, size=50)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, test.inputs)


def test_digits_split_fixed_by_seed_stratified_and_encoded() -> None:
    train, test = digits("train", 0), digits("test", 0)
    assert len(train) + len(test) == 1797 and train.inputs.shape[1] == 64 and train.vocab_size == 17
    assert train.inputs.min() >= 0 and train.inputs.max() <= 16
    assert torch.equal(digits("test", 0).inputs, test.inputs) and not torch.equal(digits("test", 1).inputs, test.inputs)
    assert torch.bincount(test.targets).min() >= 40  # stratified: every class ~45 times
    values, images = digits("test", 0, as_="values"), digits("test", 0, as_="images")
    torch.testing.assert_close(values.inputs * 16, test.inputs.float())
    assert images.inputs.shape == (len(test), 1, 8, 8) and torch.equal(images.inputs.flatten(1), values.inputs)


@pytest.mark.parametrize("call, expected", [
    (lambda: listops(4, 0, max_len=3), "max_len >= 5"),
    (lambda: digits("valid", 0), "split"),
    (lambda: make_task("pathfinder", "train", 0), "unknown task"),
])
def test_bad_arguments_are_named(call, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        call()
