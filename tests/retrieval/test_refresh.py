"""Refresh: full and incremental builds agree, rolling re-embedding, the schedule hook, over-retrieve-and-rerank."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from hybrid_pretrain.retrieval.build import build_full, refresh_incremental, stale_ids
from hybrid_pretrain.retrieval.index import IndexSpec, load_index, read_manifest
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.passages import write_store
from hybrid_pretrain.retrieval.refresh import IndexRefresher, RefreshConfig, over_retrieve_rerank
from hybrid_pretrain.tests.data_pipeline.corpora import prose


class HashEmbedder:
    """A deterministic bag-of-words embedder; `salt` plays a newer encoder checkpoint."""

    dim = 32

    def __init__(self, salt: str = "") -> None:
        self.salt = salt
        self.fingerprint = hashlib.sha256(salt.encode()).hexdigest()

    def _word(self, w: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b((self.salt + w).encode(), digest_size=4).digest(), "little")
        return np.random.default_rng(seed).normal(size=self.dim)

    def embed(self, texts):
        out = np.stack([sum(self._word(w) for w in t.split()) for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _store(path, seeds):
    return write_store(path, [("s", i, prose(s, 150)) for i, s in enumerate(seeds)], progress=False)


def test_incremental_refresh_equals_full_rebuild(tmp_path):
    emb = HashEmbedder()
    build_full(_store(tmp_path / "p1", range(20)), emb, tmp_path / "inc", IndexSpec("flat"), progress=False)
    new = _store(tmp_path / "p2", [0, 1, 2, 99, *range(4, 18), 50, 51])  # doc 3 edited, 18-19 gone, 2 new
    m = refresh_incremental(tmp_path / "inc", new, emb, progress=False)
    assert m["version"] == 2 and m["refresh"] == "incremental" and m["ntotal"] == len(new)
    assert m["changes"]["added"] < len(new) / 3  # only what changed was embedded
    build_full(new, emb, tmp_path / "full", IndexSpec("flat"), progress=False)
    q = emb.embed([prose(3, 40), prose(50, 40), "whale"])
    inc, _ = load_index(tmp_path / "inc", use_gpu=False)
    full, _ = load_index(tmp_path / "full", use_gpu=False)
    np.testing.assert_array_equal(inc.search(q, 8)[1], full.search(q, 8)[1])


def test_rolling_reembed_with_newer_encoder(tmp_path):
    store = _store(tmp_path / "p", range(12))
    old, new = HashEmbedder("v1"), HashEmbedder("v2")
    build_full(store, old, tmp_path / "ix", IndexSpec("ivfpq", nlist=2, pq_m=8, pq_bits=4), progress=False)
    half = len(store) // 2
    m = refresh_incremental(tmp_path / "ix", store, new, stale_ids(tmp_path / "ix", new.fingerprint, half),
                            progress=False)
    assert m["encoder_counts"] == {old.fingerprint: len(store) - half, new.fingerprint: half}
    m = refresh_incremental(tmp_path / "ix", store, new, stale_ids(tmp_path / "ix", new.fingerprint, len(store)),
                            progress=False)
    assert m["encoder_counts"] == {new.fingerprint: len(store)} and m["ntotal"] == len(store)


def test_schedule_hook_refreshes_and_swaps(tmp_path):
    store = _store(tmp_path / "p", range(10))
    spec = IndexSpec("flat")
    build_full(store, HashEmbedder("v0"), tmp_path / "ix", spec, progress=False)
    live = LiveIndex(tmp_path / "ix", use_gpu=False)
    refresher = IndexRefresher(RefreshConfig(refresh_every=3), tmp_path / "ix", store, spec,
                               on_publish=lambda v: live.reload())
    published = [s for s in range(1, 10) if refresher.maybe_refresh(s, HashEmbedder(f"v{s}")) is not None]
    assert published == [3, 6, 9] and live.version == 4
    assert read_manifest(tmp_path / "ix")["encoder_sha256"] == HashEmbedder("v9").fingerprint
    q = HashEmbedder("v9").embed([store.text(5)])
    assert live.search(q, 1)[1][0, 0] == store.ids[5]  # the swapped-in index speaks the newest encoder


def test_a_due_refresh_is_skipped_while_the_index_speaks_the_current_encoder(tmp_path):
    store = _store(tmp_path / "p", range(10))
    spec = IndexSpec("flat")
    build_full(store, HashEmbedder("frozen"), tmp_path / "ix", spec, progress=False)
    for mode in ("full", "rolling"):
        refresher = IndexRefresher(RefreshConfig(refresh_every=1, mode=mode, rolling_fraction=0.5), tmp_path / "ix",
                                   store, spec)
        assert refresher.up_to_date(HashEmbedder("frozen"))
        assert refresher.maybe_refresh(1, HashEmbedder("frozen")) is None  # a frozen passage tower: nothing stale
    assert read_manifest(tmp_path / "ix")["version"] == 1
    assert not refresher.up_to_date(HashEmbedder("trained"))
    assert refresher.maybe_refresh(2, HashEmbedder("trained"))["version"] == 2  # rolling: half re-embedded
    assert not refresher.up_to_date(HashEmbedder("trained"))  # the other half is still stale
    assert refresher.maybe_refresh(3, HashEmbedder("trained"))["version"] == 3
    assert refresher.up_to_date(HashEmbedder("trained"))


def test_over_retrieve_rerank_uses_current_encoder(tmp_path):
    store = _store(tmp_path / "p", range(15))
    stale, current = HashEmbedder("old"), HashEmbedder("new")
    build_full(store, stale, tmp_path / "ix", IndexSpec("flat"), progress=False)
    index, _ = load_index(tmp_path / "ix", use_gpu=False)
    q = torch.tensor(current.embed([store.text(7), prose(2, 30)]), requires_grad=True)
    scores, ids = over_retrieve_rerank(q, index, store, lambda t: torch.tensor(current.embed(t)), k=3,
                                       factor=len(store))  # every passage is a candidate: equals exact search
    p = current.embed(store.texts(range(len(store))))
    truth = np.argsort(-(q.detach().numpy() @ p.T), axis=1)[:, :3]
    np.testing.assert_array_equal(ids, np.asarray(store.ids)[truth])
    scores.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0  # trains the query side
