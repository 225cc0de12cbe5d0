"""Atlas's LM filter: a training window never retrieves the passage holding its own text."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hybrid_pretrain.models.atlas.model import Atlas
from hybrid_pretrain.models.atlas.source_filter import (
    SOURCE_NGRAM,
    holds_window_text,
    holds_window_text_reference,
    without_source,
)
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.retrieval.passage_source import PassageSource
from hybrid_pretrain.retrieval.passages import write_store
from hybrid_pretrain.tests.atlas_corpus import tiny_tokenizer
from hybrid_pretrain.tests.data_pipeline.corpora import prose

Q, P, K, V = 8, 16, 2, 200


def test_a_passage_holds_the_window_text_from_a_shared_span_of_source_ngram_tokens():
    window = torch.arange(100, 100 + 3 * SOURCE_NGRAM)[None]  # (1, L)
    shared = torch.cat([torch.full((4,), 7), window[0, 5 : 5 + SOURCE_NGRAM], torch.full((2,), 9)])
    short = torch.cat([window[0, :SOURCE_NGRAM - 1], torch.full((7,), 9)])  # one token short of the n-gram
    padded = torch.cat([window[0, :SOURCE_NGRAM - 1], torch.full((7,), 0)])
    passages = torch.stack([shared, short, padded])[None]  # (1, 3, 16)
    mask = torch.ones_like(passages, dtype=torch.bool)
    mask[0, 2, SOURCE_NGRAM - 1 :] = False  # padding never completes an n-gram
    assert holds_window_text(window, passages, mask).tolist() == [[True, False, False]]


def test_vectorised_filter_matches_the_set_based_reference_on_repeated_tokens_and_masks():
    g = torch.Generator().manual_seed(0)
    outcomes = set()
    for trial, (B, C, L, P, vocab, n) in enumerate([(4, 6, 24, 20, 3, 3), (3, 5, 40, 30, 2, SOURCE_NGRAM),
                                                    (2, 3, 12, 8, 4, 2), (2, 3, 5, 30, 2, 6), (2, 3, 20, 4, 2, 6)]):
        windows = torch.randint(vocab, (B, L), generator=g)
        passages = torch.randint(vocab, (B, C, P), generator=g)
        passages[:, 0, : min(P, L)] = windows[:, : min(P, L)]  # a passage cut from the window
        mask = torch.rand(B, C, P, generator=g) < 0.8  # holes: kept tokens are read in order across them
        lengths = torch.randint(P + 1, (B, C), generator=g)
        mask[:, 1] = torch.arange(P) < lengths[:, 1, None]  # right padding, as PassageSource pads
        expected = holds_window_text_reference(windows, passages, mask, n)
        assert holds_window_text(windows, passages, mask, n).tolist() == expected.tolist(), trial
        outcomes |= set(expected.flatten().tolist())
    assert outcomes == {True, False}


def test_without_source_keeps_rank_order_and_fills_with_holders_only_when_short():
    holds = torch.tensor([[True, False, False, True], [True, True, True, False]])
    assert without_source(holds, 2).tolist() == [[1, 2], [3, 0]]


class FixedCandidates:
    """A CandidateSource returning the same passages, best first, for every query."""

    def __init__(self, passages: torch.Tensor) -> None:
        self.passages = passages  # (C, P)

    def __len__(self) -> int:
        return len(self.passages)

    def candidates(self, query_emb, n):
        B = query_emb.shape[0]
        ids = np.tile(np.arange(n), (B, 1))
        toks = self.passages[:n][None].expand(B, -1, -1)
        return ids, toks, torch.ones_like(toks, dtype=torch.bool)


def make_model(exclude: bool) -> Atlas:
    torch.manual_seed(0)
    opts = {"n_passages": K, "query_len": Q, "passage_len": P, "encoder_layers": 1, "retriever_layers": 1,
            "exclude_source": "passage" if exclude else "none"}
    return Atlas(ModelConfig(arch="atlas", vocab_size=V, d_model=32, n_heads=4, layers="A", max_seq_len=64,
                             options={"atlas": opts}))


def test_training_windows_skip_their_source_passage_and_scoring_without_a_window_does_not():
    window = torch.arange(1, 1 + Q + P)[None]  # (1, Q + P): the text of candidate 0 follows the query
    source = torch.arange(1 + Q, 1 + Q + P)  # the passage the window's target was cut from
    others = torch.randint(100, V, (3, P))
    for exclude, expected in ((True, [1, 2]), (False, [0, 1])):
        model = make_model(exclude)
        model.attach(FixedCandidates(torch.cat([source[None], others])))
        found = model.retrieve(window[:, :Q], window)
        assert found.ids.tolist() == [expected]
        assert found.scores.shape == (1, K)
    assert model.retrieve(window[:, :Q]).ids.tolist() == [[0, 1]]  # evaluation: no window, no filter
    model = make_model(True)
    model.attach(FixedCandidates(torch.cat([source[None], others])))
    model.train()
    model(window, window.roll(-1, 1)).backward()
    assert model.step_metrics()["source_found"] == 1.0


def test_same_document_finds_the_document_a_window_was_cut_from(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    words = [prose(i, 40).split() for i in range(5)]
    documents = [" ".join(rng.choice(words[d]) + str(rng.randrange(1000)) for _ in range(150)) for d in range(5)]
    store = write_store(tmp_path / "store", [("docs", d, text) for d, text in enumerate(documents)], words=30,
                        progress=False)
    source = PassageSource(None, store, tokenizer, passage_len=16)
    with pytest.raises(RuntimeError, match="build_document_table"):  # never a silent build inside a training step
        source.same_document(torch.zeros(1, 48, dtype=torch.long), np.asarray(store.ids)[None, :])
    assert source.build_document_table() >= 0
    docs = np.array([store[r].doc for r in range(len(store))])
    window = torch.tensor(tokenizer.encode(documents[3])[100:148])[None]  # (1, 48): from inside document 3
    flags = source.same_document(window, np.asarray(store.ids)[None, :])  # every passage as a candidate
    assert flags[0].numpy().tolist() == (docs == 3).tolist()
    other = torch.tensor(tokenizer.encode(" ".join(documents[4].split()[::-1])))[None, :48]  # no span in order
    assert not source.same_document(other, np.asarray(store.ids)[None, :]).any()
