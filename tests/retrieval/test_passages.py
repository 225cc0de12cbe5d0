"""Passage store: ~100-word passages, stable ids, text read back from disk, corpus diffs."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_pretrain.retrieval.passages import (
    PassageError,
    PassageStore,
    build_passage_store,
    diff_passages,
    passage_id,
    split_passages,
    write_store,
)
from hybrid_pretrain.tests.data_pipeline.corpora import prose


def _docs(texts: list[str], source: str = "s") -> list[tuple[str, int, str]]:
    return [(source, i, t) for i, t in enumerate(texts)]


def test_split_keeps_text_and_word_counts():
    doc = prose(1, 250)
    parts = list(split_passages(doc, 100))
    assert [o for o, _ in parts] == [0, 100, 200]
    assert [len(t.split()) for _, t in parts] == [100, 100, len(doc.split()) - 200]
    assert all(t in doc for _, t in parts)  # spans of the original, newlines kept


def test_store_round_trip_and_lookup(tmp_path):
    texts = [prose(i, 230) for i in range(5)]  # 19 lines of 13 words: 247 words, 3 passages each
    store = write_store(tmp_path / "p", _docs(texts), progress=False)
    assert len(store) == 15 and store.meta["documents"] == 5
    p = store[4]
    assert (p.doc, p.offset) == (1, 100) and p.id == passage_id("s", 1, 100)
    assert p.text == list(split_passages(texts[1]))[1][1]
    ids = np.asarray(store.ids)
    np.testing.assert_array_equal(store.rows_of(ids[::-1]), np.arange(15)[::-1])
    assert store.rows_of([-1, 12345])[0] == -1
    assert [q.text for q in store.by_ids(ids[:3])] == store.texts([0, 1, 2])
    reopened = PassageStore(tmp_path / "p")  # read back from disk, nothing cached in RAM
    assert reopened[14] == store[14]


def test_ids_stable_when_corpus_grows(tmp_path):
    a = write_store(tmp_path / "a", _docs([prose(i) for i in range(3)]), progress=False)
    b = write_store(tmp_path / "b", _docs([prose(i) for i in range(4)]), progress=False)
    assert set(np.asarray(a.ids)) < set(np.asarray(b.ids))


def test_diff_finds_added_removed_and_edited(tmp_path):
    old = write_store(tmp_path / "a", _docs([prose(i, 150) for i in range(3)]), progress=False)
    edited = [prose(0, 150), prose(99, 150)]  # doc 1 edited, doc 2 gone
    new = write_store(tmp_path / "b", _docs(edited + [prose(5, 150)]), progress=False)
    remove, add_rows = diff_passages(np.asarray(old.ids), np.asarray(old.digests), new)
    old_doc = {int(i): old[r].doc for r, i in enumerate(old.ids)}
    assert sorted(old_doc[int(i)] for i in remove) == [1, 1, 2, 2]  # edited doc 1 twice; doc 2 not in new
    assert sorted(new[int(r)].doc for r in add_rows) == [1, 1, 2, 2]  # edited doc 1 and the new doc 2


def test_build_from_data_path(tmp_path):
    (tmp_path / "a.txt").write_text(prose(3, 300))
    store = build_passage_store(str(tmp_path / "a.txt"), tmp_path / "p", progress=False)
    assert len(store) == -(-len(prose(3, 300).split()) // 100) and store[0].source == str(tmp_path / "a.txt")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PassageError, match="gave no passages"):
        write_store(tmp_path / "p", _docs(["   "]), progress=False)
    with pytest.raises(PassageError, match="missing passages.jsonl"):
        PassageStore(tmp_path)
