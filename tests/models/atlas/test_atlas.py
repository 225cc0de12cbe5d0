"""Atlas end to end on a tiny store: retrieval, FiD reader, retriever losses, staleness strategies, refresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.models.atlas.model import Atlas
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.retrieval.for_training import RetrievalConfig, TrainingRetrieval
from hybrid_pretrain.retrieval.index import read_manifest
from hybrid_pretrain.retrieval.passages import PassageStore
from hybrid_pretrain.tests.atlas_corpus import tiny_store, tiny_tokenizer
from hybrid_pretrain.tests.data_pipeline.corpora import prose
from hybrid_pretrain.training.optimizer import param_groups

Q, P, K = 8, 16, 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> PassageStore:
    return tiny_store(tmp_path_factory.mktemp("store"))


def make_model(tokenizer, **atlas) -> Atlas:
    torch.manual_seed(0)
    opts = {"n_passages": K, "query_len": Q, "passage_len": P, "encoder_layers": 1, "retriever_layers": 1, **atlas}
    cfg = ModelConfig(arch="atlas", vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, layers="HA",
                      h3_d_state=8, max_seq_len=64, options={"atlas": opts})
    return Atlas(cfg)


def attach(model, store, tokenizer, tmp_path, **cfg) -> TrainingRetrieval:
    return TrainingRetrieval(RetrievalConfig(**cfg), tmp_path / "index", store, model, tokenizer, rank=0,
                             world_size=1, barrier=lambda: None, log=lambda m: None)


def batch(tokenizer, n=2, length=24) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.encode_batch([prose(100 + i, 80)])[0][: length + 1] for i in range(n)]
    seq = torch.tensor(rows)
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("loss", ["pdist", "emdr2", "loop", "adist"])
def test_retriever_learns_only_from_its_loss_and_reader_only_from_the_answer(loss, tokenizer, store, tmp_path):
    model = make_model(tokenizer, retriever_loss=loss)
    attach(model, store, tokenizer, tmp_path)
    x, y = batch(tokenizer)
    model.train()
    model(x, y).backward()
    train_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("retriever.") and g.abs().sum() > 0 for n, g in train_grads.items())
    assert model.last["retriever_loss"] >= 0 or loss == "emdr2"
    model.zero_grad()
    model.eval()  # evaluation: the reader's loss alone (dropout is 0, so the forward is the same)
    model(x, y).backward()
    for name, p in model.named_parameters():
        if name.startswith("reader."):
            torch.testing.assert_close(train_grads[name], p.grad, msg=f"retriever loss leaked into {name}")


def test_document_exclusion_builds_its_table_when_retrieval_is_set_up(tokenizer, store, tmp_path):
    logs = []
    for exclude in ("document", "passage"):
        model = make_model(tokenizer, exclude_source=exclude)
        TrainingRetrieval(RetrievalConfig(), tmp_path / exclude, store, model, tokenizer, rank=0, world_size=1,
                          barrier=lambda: None, log=logs.append)
        assert (model.source._documents is not None) == (exclude == "document")
    assert sum("document table" in m for m in logs) == 1
    x, y = batch(tokenizer)
    model = make_model(tokenizer, exclude_source="document")
    attach(model, store, tokenizer, tmp_path)
    model.train()
    model(x, y).backward()  # the first step filters by document without building anything
    assert "source_found" in model.step_metrics()


def test_eval_loss_is_the_reader_cross_entropy(tokenizer, store, tmp_path):
    model = make_model(tokenizer).eval()
    attach(model, store, tokenizer, tmp_path)
    x, y = batch(tokenizer)
    logits = model(x)
    assert logits.shape == (2, x.shape[1] - Q, tokenizer.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, Q:].flatten())
    torch.testing.assert_close(model(x, y), expected)


def test_reader_is_causal_in_the_target(tokenizer, store, tmp_path):
    model = make_model(tokenizer).eval()
    attach(model, store, tokenizer, tmp_path)
    x, _ = batch(tokenizer)
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 7) % tokenizer.vocab_size
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_query_side_only_freezes_the_passage_tower(tokenizer, store, tmp_path):
    model = make_model(tokenizer, query_side_only=True)
    attach(model, store, tokenizer, tmp_path)
    before = {k: v.clone() for k, v in model.frozen_passage_tower.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch(tokenizer)
    for _ in range(2):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    assert all(p.grad is None for p in model.frozen_passage_tower.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.frozen_passage_tower.state_dict().items())
    assert not torch.equal(model.retriever.embed.weight, model.frozen_passage_tower.embed.weight)


def test_query_side_only_starts_from_the_same_weights_and_random_stream(tokenizer):
    both = make_model(tokenizer)
    after_both = torch.rand(4)
    query_side = make_model(tokenizer, query_side_only=True)
    after_query_side = torch.rand(4)  # e.g. the generic bi-encoder drawn next (synthetic.atlas_facts.prepare)
    torch.testing.assert_close(after_both, after_query_side)
    tied = both.state_dict()
    for name, value in query_side.state_dict().items():
        torch.testing.assert_close(value, tied[name.replace("frozen_passage_tower.", "retriever.")], msg=name)


def test_rerank_keeps_the_current_towers_top_k(tokenizer, store, tmp_path):
    model = make_model(tokenizer, rerank_factor=2).eval()
    attach(model, store, tokenizer, tmp_path)
    x, _ = batch(tokenizer)
    query = x[:, :Q]
    found = model.retrieve(query)
    q_emb = model.retriever(query, model.query_mask(query))
    cand_ids, cand, cand_mask = model.source.candidates(q_emb, 2 * K)
    all_scores = torch.einsum("bd,bnd->bn", q_emb, model.retriever(cand.flatten(0, 1), cand_mask.flatten(0, 1))
                              .view(2, 2 * K, -1)) / q_emb.shape[-1] ** 0.5  # Atlas's q.p / sqrt(d)
    top = all_scores.topk(K, dim=1)
    torch.testing.assert_close(found.scores, top.values)
    np.testing.assert_array_equal(found.ids, np.take_along_axis(cand_ids, top.indices.numpy(), axis=1))
    assert found.tokens.shape == (2, K, P)


def test_refresh_reindexes_with_the_current_weights(tokenizer, store, tmp_path):
    model = make_model(tokenizer)
    retrieval = attach(model, store, tokenizer, tmp_path, refresh_every=2)
    first = read_manifest(tmp_path / "index")
    retrieval.after_step(1)  # not due
    assert retrieval.index.version == first["version"]
    with torch.no_grad():
        model.retriever.embed.weight.add_(0.5)
    retrieval.after_step(2)
    second = read_manifest(tmp_path / "index")
    assert retrieval.index.version == second["version"] == first["version"] + 1
    assert second["encoder_sha256"] != first["encoder_sha256"] and second["ntotal"] == len(store)
    q = model.retriever(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)).detach().numpy()
    _, ids = retrieval.index.search(q, 1)
    rows = store.rows_of(ids.reshape(-1))
    p = retrieval.embedder().embed(store.texts(rows))
    exact = retrieval.embedder().embed(store.texts(range(len(store)))) @ q[0]
    assert np.isclose(p[0] @ q[0], exact.max(), rtol=1e-4)  # the refreshed flat index finds the true best passage


def test_training_lowers_the_loss(tokenizer, store, tmp_path):
    model = make_model(tokenizer)
    attach(model, store, tokenizer, tmp_path)
    x, y = batch(tokenizer, n=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(model.last["reader_loss"])
    assert losses[-1] < 0.7 * losses[0]


def test_options_are_checked(tokenizer):
    with pytest.raises(ConfigError, match="retriever_loss must be one of"):
        make_model(tokenizer, retriever_loss="kl")
    with pytest.raises(ConfigError, match="query_len \\+ passage_len"):
        make_model(tokenizer, passage_len=60)


def test_retriever_lr_hint_and_delay(tokenizer, store, tmp_path):
    model = make_model(tokenizer, retriever_lr=2e-4)
    groups = param_groups(model, 2e-3, 0.1)
    retriever = {id(p) for p in model.retriever.parameters()}
    for group in groups:
        in_retriever = {id(p) in retriever for p in group["params"]}
        assert len(in_retriever) == 1 and (group["lr"] == 2e-4) == in_retriever.pop()
    retrieval = attach(model, store, tokenizer, tmp_path, retriever_delay=3)
    retrieval.start_at(0)
    assert not model.learn_retriever
    retrieval.after_step(2)
    assert not model.learn_retriever  # step 3 is still the reader's alone
    retrieval.after_step(3)
    assert model.learn_retriever
    retrieval.start_at(5)  # resuming past the delay
    assert model.learn_retriever
