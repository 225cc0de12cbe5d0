"""evaluation.open_book: Atlas scored with retrieved, empty and random passages, each mode checked by hand."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer
from hybrid_pretrain.evaluation import open_book
from hybrid_pretrain.launcher import perplexity
from hybrid_pretrain.models.atlas.model import Atlas
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.roles import IGNORE_INDEX
from hybrid_pretrain.retrieval.encoder import tokenize_padded
from hybrid_pretrain.retrieval.index import IndexSpec
from hybrid_pretrain.retrieval.passages import PassageStore
from hybrid_pretrain.tests.atlas_corpus import tiny_store, tiny_tokenizer
from hybrid_pretrain.tests.data_pipeline.corpora import prose
from hybrid_pretrain.training.checkpoint import write_manifest
from hybrid_pretrain.training.config import load_config, save_resolved
from hybrid_pretrain.training.weights import RunWeights, save_consolidated

Q, P, K, SEQ = 8, 16, 3, 24
SPEC = IndexSpec(kind="flat")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> PassageStore:
    return tiny_store(tmp_path_factory.mktemp("store"))


def model_config(tokenizer) -> ModelConfig:
    opts = {"n_passages": K, "query_len": Q, "passage_len": P, "encoder_layers": 1, "retriever_layers": 1}
    return ModelConfig(arch="atlas", vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, layers="HA",
                       h3_d_state=8, max_seq_len=64, options={"atlas": opts})


@pytest.fixture()
def model(tokenizer) -> Atlas:
    torch.manual_seed(0)
    return Atlas(model_config(tokenizer)).eval()


@pytest.fixture()
def stream(tokenizer) -> list[int]:
    return [tokenizer.eos_id] + tokenizer.encode(prose(500, 60))  # 5 windows of SEQ, the last one short


def reader_nll(model: Atlas, inputs, labels, passages) -> tuple[float, int]:
    logits = model(inputs, passages=passages)  # (B, SEQ - Q, V)
    labels = labels[:, Q:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum").item(), int(
        (labels != IGNORE_INDEX).sum())


def test_windows_score_every_token_after_the_first_query_once(stream):
    scored = []
    for inputs, labels in open_book.atlas_windows(stream, SEQ, Q, batch_size=2):
        assert inputs.shape[1] == SEQ and (labels[:, :Q] == IGNORE_INDEX).all()
        assert (inputs[:, :Q] != 0).all()  # every query whole, never padding
        for row in labels:
            scored += row[row != IGNORE_INDEX].tolist()
    assert scored == stream[Q + 1:]
    assert open_book.count_windows(len(stream), SEQ, Q) == -(-(len(stream) - 1 - Q) // (SEQ - Q))


def test_empty_mode_is_the_reader_with_every_passage_masked(model, store, tokenizer, stream):
    """Closed book = the query alone: any passages, all masked out, give the same NLL."""
    with open_book.open_passages(model, tokenizer, store.path, None, SPEC, log=lambda m: None) as source:
        scores = open_book.score_modes(model, stream, SEQ, 2, ["empty"], progress=False)
        total, tokens = 0.0, 0
        with torch.no_grad():
            for inputs, labels in open_book.atlas_windows(stream, SEQ, Q, 2):
                rows = np.arange(len(inputs) * K) % len(source)
                ids, _ = tokenize_padded(tokenizer, store.texts(rows), P)
                masked = (ids.view(len(inputs), K, P), torch.zeros(len(inputs), K, P, dtype=torch.bool))
                nll, n = reader_nll(model, inputs, labels, masked)
                total, tokens = total + nll, tokens + n
    assert scores["empty"].tokens == tokens == len(stream) - 1 - Q
    assert scores["empty"].nll == pytest.approx(total, rel=1e-5)


def test_retrieved_mode_reads_the_top_k_of_the_model_own_towers(model, store, tokenizer, stream):
    """Brute force: every passage embedded by the passage tower, the K best inner products with the query."""
    with open_book.open_passages(model, tokenizer, store.path, None, SPEC, log=lambda m: None) as source:
        found: list[np.ndarray] = []
        scores = open_book.score_modes(model, stream, SEQ, 2, ["retrieved"], progress=False, retrieved_rows=found)
    with torch.no_grad():
        p_ids, p_mask = tokenize_padded(tokenizer, store.texts(range(len(store))), P)
        p_emb = model.passage_tower(p_ids, p_mask)  # (N, D)
        total = 0.0
        for b, (inputs, labels) in enumerate(open_book.atlas_windows(stream, SEQ, Q, 2)):
            query = inputs[:, :Q]
            top = (model.retriever(query, model.query_mask(query)) @ p_emb.T).topk(K, dim=1).indices  # (B, K)
            np.testing.assert_array_equal(found[b], np.asarray(store.ids)[top.numpy()])
            rows = top.reshape(-1).tolist()
            ids, mask = tokenize_padded(tokenizer, store.texts(rows), P)
            total += reader_nll(model, inputs, labels, (ids.view(-1, K, P), mask.view(-1, K, P)))[0]
    assert len(source) == len(store)
    assert scores["retrieved"].nll == pytest.approx(total, rel=1e-5)


def test_random_mode_draws_store_passages_reproducibly(model, store, tokenizer, stream):
    with open_book.open_passages(model, tokenizer, store.path, None, SPEC, log=lambda m: None) as source:
        rows, ids, mask = open_book.RandomPassages(source, K, seed=3)(4)
        again = open_book.RandomPassages(source, K, seed=3)(4)[0]
        assert rows.shape == (4, K) and ids.shape == mask.shape == (4, K, P)
        np.testing.assert_array_equal(rows, again)
        assert ((rows >= 0) & (rows < len(store))).all() and len(np.unique(rows)) > K
        expected, _ = tokenize_padded(tokenizer, store.texts(rows.reshape(-1)), P)
        torch.testing.assert_close(ids.view(-1, P), expected)
        runs = [open_book.score_modes(model, stream, SEQ, 2, ["random"], open_book.RandomPassages(source, K, seed),
                                      progress=False)["random"].nll for seed in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]


def test_without_the_retrieved_mode_nothing_is_embedded_or_indexed(model, store, tokenizer, stream, tmp_path):
    """--passages empty,random reads the store by row only: no index is built, and the same random passages come."""
    logs: list[str] = []
    with open_book.open_passages(model, tokenizer, store.path, tmp_path / "none", SPEC, log=logs.append,
                                 search=False) as source:
        rows = open_book.RandomPassages(source, K, seed=3)(4)[0]
        scores = open_book.score_modes(model, stream, SEQ, 2, ["empty", "random"],
                                       open_book.RandomPassages(source, K, seed=0), progress=False)
        with pytest.raises(RuntimeError, match="without an index"):
            source.candidates(torch.zeros(1, 8), K)
    assert logs == [] and model.source is None
    with open_book.open_passages(model, tokenizer, store.path, None, SPEC, log=lambda m: None) as searched:
        np.testing.assert_array_equal(rows, open_book.RandomPassages(searched, K, seed=3)(4)[0])
        again = open_book.score_modes(model, stream, SEQ, 2, ["random"], open_book.RandomPassages(searched, K, seed=0),
                                      progress=False)
    assert scores["random"].nll == again["random"].nll


def test_the_run_index_is_reused_only_when_the_passage_tower_matches(model, store, tokenizer, tmp_path):
    logs: list[str] = []
    with open_book.open_passages(model, tokenizer, store.path, tmp_path / "none", SPEC, log=logs.append):
        pass
    assert "embedding" in logs[-1]
    from hybrid_pretrain.retrieval.build import build_full
    from hybrid_pretrain.retrieval.passage_source import PassageEmbedder

    build_full(store, PassageEmbedder(model, tokenizer, P), tmp_path / "index", SPEC, barrier=lambda: None,
               progress=False)
    with open_book.open_passages(model, tokenizer, store.path, tmp_path / "index", SPEC, log=logs.append):
        pass
    assert "matches" in logs[-1]
    with torch.no_grad():
        model.retriever.norm.bias.add_(0.1)  # a later step moved the passage tower: the run's index is stale
    with open_book.open_passages(model, tokenizer, store.path, tmp_path / "index", SPEC, log=logs.append):
        pass
    assert "embedding" in logs[-1]


def test_modes_are_parsed_strictly():
    assert open_book.parse_modes("empty, retrieved") == ["empty", "retrieved"]
    for bad in ("closed", "empty,empty", ""):
        with pytest.raises(ConfigError, match="--passages must be"):
            open_book.parse_modes(bad)


def test_cli_scores_an_atlas_checkpoint_in_three_modes(model, store, tokenizer, tmp_path, capsys):
    (tmp_path / "book.txt").write_text(prose(700, 200), encoding="utf-8")
    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.seq_len={SEQ}", "data.vocab_size=320"])
    cfg.model = model_config(tokenizer)
    save_consolidated(RunWeights(cfg, model.state_dict(), tokenizer, "random"), tmp_path / "ckpt")
    args = [str(tmp_path / "ckpt"), "--data", str(tmp_path / "book.txt"), "--no-progress"]
    assert perplexity.main([*args, "--passage-store", str(store.path)]) == 0
    out = capsys.readouterr().out.splitlines()
    result = json.loads(out[-1])
    assert [line.split()[0] for line in out[:3]] == ["retrieved", "empty", "random"]
    for key in ("retrieved", "empty", "random"):
        assert result[f"perplexity_{key}"] > 1
    assert result["gap_vs_empty"] == pytest.approx(result["perplexity_retrieved"] / result["perplexity_empty"] - 1)
    assert result["passages"] == len(store) and result["tokens"] > 0

    assert perplexity.main([*args, "--passages", "empty"]) == 2  # no store beside a converted checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no passage store" in err[0] and "--passage-store" in err[0]


def test_cli_finds_the_store_of_an_atlas_run_directory(model, store, tokenizer, tmp_path, capsys):
    """A run directory as launcher/pretrain.py leaves it: weights read back by load_run (Atlas keeps its embedding
    under reader.), tokenizer in data/, passage store in retrieval/passages, no index yet (built from the tower)."""
    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", f"data.seq_len={SEQ}", "data.vocab_size=320"])
    cfg.model = model_config(tokenizer)
    save_resolved(cfg, run)
    (run / "data").mkdir()
    shutil.copyfile(tokenizer.path, run / "data" / "tokenizer.model")
    shutil.copytree(store.path, run / "retrieval" / "passages")
    tag_dir = run / "checkpoints" / "step00000001"
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}},
               tag_dir / "mp_rank_00_model_states.pt")
    write_manifest(tag_dir)
    (run / "checkpoints" / "latest").write_text("step00000001")
    (tmp_path / "book.txt").write_text(prose(701, 150), encoding="utf-8")
    assert perplexity.main([str(run), "--data", str(tmp_path / "book.txt"), "--passages", "retrieved,empty",
                            "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert set(result) >= {"perplexity_retrieved", "perplexity_empty", "gap_vs_empty"} and "gap_vs_random" not in result
    assert result["tag"] == "step00000001" and f"embedding {len(store)} passages" in captured.err


def test_hub_statistics_count_distinct_first_passages():
    spread = np.array([[1, 9], [2, 9], [3, 9], [4, 9]])  # (windows, K)
    hubs = np.array([[7, 1], [7, 2], [7, 3], [8, 4]])
    assert open_book.hub_statistics(spread) == {"windows": 4, "distinct_top1": 4, "commonest_top1_share": 0.25}
    assert open_book.hub_statistics(hubs) == {"windows": 4, "distinct_top1": 2, "commonest_top1_share": 0.75}
