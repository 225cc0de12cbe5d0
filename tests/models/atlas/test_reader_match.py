"""The reader's "occurs in the query" flag (AtlasOptions.match_feature, issue 22)."""

from __future__ import annotations

import torch

from hybrid_pretrain.models.atlas.model import Atlas
from hybrid_pretrain.models.atlas.reader import in_query_flags
from hybrid_pretrain.models.config import ModelConfig


def test_flags_mark_passage_tokens_that_occur_in_the_query() -> None:
    # query (3 slots, the last padding with id 0) then passage (4 slots, the last padding)
    ids = torch.tensor([[5, 7, 0, 7, 9, 5, 0],
                        [5, 7, 0, 8, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0],
                         [1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 0, 1, 0, 1, 0],
                             [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # query padding matches no passage padding
    assert torch.equal(in_query_flags(ids, mask, 3), expected)


def _model(match: bool) -> Atlas:
    torch.manual_seed(0)
    return Atlas(ModelConfig(arch="atlas", vocab_size=50, d_model=16, n_heads=2, layers="A", max_seq_len=16,
                             options={"atlas": {"n_passages": 2, "query_len": 4, "passage_len": 6,
                                                "encoder_layers": 1, "retriever_layers": 1,
                                                "match_feature": match}}))


def test_the_flag_is_off_by_default_and_reaches_the_answer_when_on() -> None:
    off, on = _model(False), _model(True)
    assert "reader.in_query" not in off.state_dict() and "reader.in_query" in on.state_dict()
    # the flag draws no random number: every other initial weight is the model's without it
    assert all(torch.equal(w, on.state_dict()[k]) for k, w in off.state_dict().items())
    with torch.no_grad():
        on.reader.in_query.copy_(torch.randn(2, 16))  # as if trained
    x = torch.tensor([[11, 12, 13, 0, 1, 20]])  # query (one padding slot), BOS, answer
    passage = torch.tensor([[[12, 30, 31, 0, 0, 0], [32, 33, 34, 0, 0, 0]]])  # the first names a query word
    on.eval()
    with torch.no_grad():
        flagged = on(x, passages=(passage, passage != 0))
        on.reader.in_query.zero_()
        unflagged = on(x, passages=(passage, passage != 0))
    assert not torch.allclose(flagged, unflagged)
