"""Synthetic task generators: each example's answer is fully determined by its input, as the task defines."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.synthetic.tasks import make_task


def test_induction_head_answer_follows_the_first_special_token() -> None:
    data = make_task("induction_head", 300, vocab=20, seq_len=30, seed=1)
    assert data.inputs.shape == (300, 29) and data.targets.shape == (300,)
    special = 19
    assert (data.inputs[:, -1] == special).all()
    for x, y in zip(data.inputs, data.targets):
        where = (x == special).nonzero().flatten().tolist()
        assert len(where) == 2 and where[0] + 1 < 28  # once inside, once as the query at the end
        assert x[where[0] + 1] == y and y != special
    assert len(set(data.targets.tolist())) == 19  # every content token can be the answer


def test_associative_recall_answer_is_the_value_bound_to_the_query() -> None:
    data = make_task("associative_recall", 300, vocab=20, seq_len=40, seed=2)
    assert data.inputs.shape == (300, 39)
    keys, values, query = data.inputs[:, 0:-1:2], data.inputs[:, 1:-1:2], data.inputs[:, -1]
    assert (keys < 10).all() and (values >= 10).all() and (query < 10).all()
    for k, v, q, y in zip(keys, values, query, data.targets):
        bound = {int(a): int(b) for a, b in zip(k, v)}
        assert all(bound[int(a)] == int(b) for a, b in zip(k, v))  # one value per key within a sequence
        assert int(q) in bound and bound[int(q)] == int(y)


def test_seeded_and_distinct_streams() -> None:
    a = make_task("associative_recall", 50, 20, 40, seed=3)
    b = make_task("associative_recall", 50, 20, 40, seed=3)
    c = make_task("associative_recall", 50, 20, 40, seed=4)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("task, vocab, seq_len, expected", [
    ("associative_recall", 20, 41, "even --seq-len"),
    ("associative_recall", 21, 40, "even --vocab"),
    ("induction_head", 2, 30, "--vocab >= 3"),
    ("copying", 20, 30, "unknown task"),
])
def test_bad_shapes_are_named(task: str, vocab: int, seq_len: int, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        make_task(task, 4, vocab, seq_len, 0)
