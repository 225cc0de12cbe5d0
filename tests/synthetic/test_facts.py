"""The generated fact-lookup task: deterministic, the answer in exactly one passage, held-out facts unseen."""

from __future__ import annotations

import pytest

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.retrieval.passages import passage_id
from hybrid_pretrain.synthetic.facts import SOURCE, FactsTask, generate


def test_same_fields_same_task_and_another_seed_another():
    task = FactsTask(entities=50, seed=3)
    assert generate(task) == generate(FactsTask(entities=50, seed=3))
    assert generate(task).documents != generate(FactsTask(entities=50, seed=4)).documents


def test_the_answer_is_only_in_the_gold_passage():
    data = generate(FactsTask(entities=200, distractors=3, values=40))
    by_id = {passage_id(src, doc, 0): text for src, doc, text in data.documents}
    assert len(by_id) == len(data.documents) == 200 * 4
    for q in data.train + data.test:
        gold = by_id[q.gold_id]
        name = data.names[q.entity]
        assert gold.endswith(f" {q.answer}.") and name in gold
        assert q.text.startswith("What is the ") and name in q.text and q.answer not in q.text
        # every other passage naming the entity is a distractor: it names the fact but never the value
        others = [t for i, t in by_id.items() if i != q.gold_id and f" {name}," in t]
        assert len(others) == 3 and not any(f" {q.answer}" in t for t in others)


def test_heldout_entities_are_never_asked_in_training():
    task = FactsTask(entities=100, heldout_fraction=0.25)
    data = generate(task)
    assert len(data.test) == 25 and len(data.train) == 75
    assert not {q.entity for q in data.test} & {q.entity for q in data.train}
    assert all(d[0] == SOURCE for d in data.documents)


def test_values_are_spread_so_a_guess_is_at_chance():
    data = generate(FactsTask(entities=2000, values=20))
    answers = [q.answer for q in data.train + data.test]
    most = max(answers.count(a) for a in set(answers))
    assert len(set(answers)) == 20 and most / len(answers) < 2 * FactsTask(values=20).chance


@pytest.mark.parametrize("field,value", [("entities", 5), ("values", 1), ("heldout_fraction", 1.0),
                                         ("attributes", ["seal", "seal"]), ("distractors", -1)])
def test_bad_fields_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        generate(FactsTask(**{field: value}))
