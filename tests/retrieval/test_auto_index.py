"""Auto index choice, recall-target tuning, on-disk re-ranking, and their manifest record, service and shards."""

from __future__ import annotations

import json
import shutil
import threading

import faiss
import numpy as np
import pytest

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.retrieval.auto import auto_nlist, choose_spec
from hybrid_pretrain.retrieval.build import build_from_vectors, build_full
from hybrid_pretrain.retrieval.client import IndexClient
from hybrid_pretrain.retrieval.config import RetrievalConfig
from hybrid_pretrain.retrieval.index import (
    IndexSpec,
    RetrievalIndexError,
    ShardedIndex,
    build_shard,
    configure,
    load_index,
    version_dir,
)
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.passages import write_store
from hybrid_pretrain.retrieval.service import IndexServer
from hybrid_pretrain.retrieval.tuning import heldout_queries, recall_without_self, tune
from hybrid_pretrain.tests.retrieval.vectors import clustered, exact_topk, ids_for, recall_at_k

N, HELD, D, K, TARGET = 20_000, 300, 32, 10, 0.95


@pytest.fixture(scope="module")
def auto_built(tmp_path_factory):
    """An auto index of N clustered vectors; HELD more from the same mixture are fresh queries, never indexed."""
    x, ids = clustered(N + HELD, D), ids_for(N + HELD)
    folder = tmp_path_factory.mktemp("auto")
    manifest = build_from_vectors(folder, IndexSpec("auto", target_recall=TARGET), x[:N], ids[:N])
    return folder, manifest, x[:N], ids[:N], x[N:]


def test_choice_by_size_and_dimension(monkeypatch):
    monkeypatch.setattr("hybrid_pretrain.retrieval.auto.gpu_search_available", lambda: False)  # a CPU machine
    assert choose_spec(5_000, 128).kind == "flat"
    big = choose_spec(1_000_000, 128)
    assert (big.kind, big.nlist, big.coarse, big.pq_m, big.opq, big.rerank) == ("ivfpq", 4096, "hnsw", 32, False, True)
    assert big.factory(128, 1_000_000) == "IVF4096_HNSW32,PQ32x8"
    assert choose_spec(1_000_000, 384).factory(384, 1_000_000) == "IVF4096_HNSW32,PQ192x4fs"  # encoder-sized
    assert choose_spec(1_000_000, 384, fast_scan=False).factory(384, 1_000_000) == "OPQ96,IVF4096_HNSW32,PQ96x8"
    assert auto_nlist(30_000) == 512 and auto_nlist(100) == 2  # at least 39 vectors per list


@pytest.mark.parametrize("n", [50_000, 101_454, 200_000, 400_000, 1_000_000, 4_000_000, 10_000_000])
def test_list_count_within_faiss_guidance(n, monkeypatch):
    """4-16 * sqrt(n) lists (FAISS's guidance) wherever 39 vectors per list allow it; real 384-d MiniLM vectors
    at 101k passages get 192 four-bit fast-scan sub-quantizers (96 bytes) and re-ranking from full vectors."""
    monkeypatch.setattr("hybrid_pretrain.retrieval.auto.gpu_search_available", lambda: False)  # a CPU machine
    assert 4 * n**0.5 <= auto_nlist(n) <= 16 * n**0.5 or auto_nlist(n) * 2 * 39 > n
    assert auto_nlist(n) * 39 <= n
    real = choose_spec(101_454, 384)
    assert real.factory(384, 101_454) == "IVF2048,PQ192x4fs" and real.rerank and real.fast_scan


def test_gpu_faiss_keeps_eight_bit_codes(monkeypatch):
    """FAISS has no GPU fast scan: where GPU FAISS searches, encoder-sized vectors keep 8-bit PQ (with OPQ)."""
    monkeypatch.setattr("hybrid_pretrain.retrieval.auto.gpu_search_available", lambda: True)
    gpu = choose_spec(101_454, 384)
    assert gpu.factory(384, 101_454) == "OPQ96,IVF2048,PQ96x8" and not gpu.fast_scan


def test_auto_choice_and_tuning_recorded_in_manifest(auto_built):
    _, manifest, *_ = auto_built
    assert manifest["choice"] == {"requested": "auto", "kind": "ivfpq", "n": N, "d": D, "factory": "IVF512,PQ8x8"}
    tuning = manifest["tuning"]
    assert tuning["target"] == TARGET and tuning["reached"] and tuning["recall"] >= TARGET
    assert {k: manifest["spec"][k] for k in tuning["params"]} == tuning["params"]  # the spec carries them


def test_encoder_sized_vectors_get_fast_scan_tuned_to_the_target(tmp_path, monkeypatch):
    """From 256 dimensions auto builds 4-bit fast-scan codes (searching on the CPU); tuning still reaches the target
    (its re-rank factor covers the coarser codes) and the recall holds on queries the tuning never saw."""
    monkeypatch.setattr("hybrid_pretrain.retrieval.auto.gpu_search_available", lambda: False)
    d, n = 256, 20_000
    x, ids = clustered(n + 200, d=d, clusters=256, spread=0.6), ids_for(n)
    x, fresh = x[:n], x[n:]  # fresh queries from the same mixture, never indexed
    manifest = build_from_vectors(tmp_path, IndexSpec("auto", target_recall=TARGET), x, ids)
    assert manifest["choice"]["factory"] == "IVF512,PQ128x4fs"
    assert manifest["tuning"]["reached"] and manifest["tuning"]["recall"] >= TARGET
    index, _ = load_index(tmp_path, use_gpu=False)
    _, truth = exact_topk(x, ids, fresh, K)
    assert recall_at_k(index.search(fresh, K)[1], truth) >= TARGET - 0.03


def test_tuned_recall_holds_on_fresh_queries(auto_built):
    folder, _, x, ids, fresh = auto_built
    index, _ = load_index(folder, use_gpu=False)
    _, truth = exact_topk(x, ids, fresh, K)
    assert recall_at_k(index.search(fresh, K)[1], truth) >= TARGET - 0.03


def test_rerank_reads_vectors_from_disk_and_keeps_index_small(auto_built, tmp_path):
    folder, manifest, *_ = auto_built
    index, _ = load_index(folder, use_gpu=False)
    assert all(isinstance(f.vectors, np.memmap) for f in index.full)
    assert index.memory_bytes() < N * D * 4 / 4  # PQ codes + ids, far below the full vectors
    with pytest.raises(RetrievalIndexError, match="cannot remove ids; use a full refresh"):
        index.remove(np.asarray([1]))
    shutil.copytree(folder, tmp_path / "copy")
    vectors = manifest["shards"][0]["full"]["vectors"]["file"]
    (version_dir(tmp_path / "copy", manifest["version"]) / vectors).write_bytes(b"corrupt")
    with pytest.raises(RetrievalIndexError, match="sha256 does not match"):
        load_index(tmp_path / "copy", use_gpu=False)


def test_service_applies_stored_parameters_and_matches_in_process(auto_built):
    folder, manifest, *_ = auto_built
    index, _ = load_index(folder, use_gpu=False)
    assert (index.spec.nprobe, index.spec.refine_k_factor) == (manifest["tuning"]["params"]["nprobe"],
                                                             manifest["tuning"]["params"]["refine_k_factor"])
    q = clustered(64, D, seed=5)
    with IndexServer(LiveIndex(folder, use_gpu=False), max_wait_ms=0.0) as server:
        np.testing.assert_array_equal(IndexClient(server.url).search(q, K)[1], index.search(q, K)[1])


def test_explicit_kind_overrides_auto_and_is_tuned(tmp_path):
    x, ids = clustered(N // 4, D), ids_for(N // 4)
    manifest = build_from_vectors(tmp_path, IndexSpec("hnsw", hnsw_m=16, target_recall=0.9), x, ids)
    assert manifest["choice"]["requested"] == manifest["choice"]["kind"] == "hnsw"
    assert set(manifest["tuning"]["params"]) == {"ef_search"} and manifest["tuning"]["recall"] >= 0.9


def test_unreachable_target_warns_and_records_best():
    x, ids = clustered(N // 4, D), ids_for(N // 4)
    spec = IndexSpec("ivfpq", nlist=32, pq_m=4)  # 4-byte codes without re-ranking: recall stays below 1.0
    index = ShardedIndex(spec, [build_shard(spec, x, ids)], use_gpu=False)
    with pytest.warns(UserWarning, match="target 1.0 not reached"):
        record = tune(index, x, ids, 1.0)
    assert not record["reached"] and 0 < record["recall"] < 1.0
    assert index.spec.nprobe == record["params"]["nprobe"]


class VectorEmbedder:
    """Passage text "v<i>" -> the i-th vector of a fixed set (a sharded build without an encoder)."""

    dim, fingerprint = D, "vectors"

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def embed(self, texts):
        return self.x[[int(t[1:]) for t in texts]]


def test_sharded_build_tunes_the_merged_index_to_the_target(tmp_path):
    """Two ranks build a shard each; the parameters are tuned on both shards searched together (as served), so
    the served index meets the target against exact search over all vectors, and the manifest says so."""
    n = 6000
    x = clustered(n, D, seed=6)
    store = write_store(tmp_path / "store", [("s", i, f"v{i}") for i in range(n)], progress=False)
    spec = IndexSpec("ivfpq", nlist=64, pq_m=8, rerank=True, target_recall=TARGET)
    barrier, out = threading.Barrier(2, timeout=300), {}  # a failing rank breaks the barrier instead of hanging

    def rank(r: int) -> None:
        out[r] = build_full(store, VectorEmbedder(x), tmp_path / "ix", spec, r, 2, barrier.wait, progress=False)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    manifest = out[0]
    assert len(manifest["shards"]) == 2 and manifest["ntotal"] == n and not list((tmp_path / "ix").glob("*.staging"))
    tuning = manifest["tuning"]
    assert tuning["shards"] == 2 and tuning["reached"] and tuning["recall"] >= TARGET
    assert "merged_recall" not in tuning  # one field: `recall` is measured on the shards searched together
    assert {k: manifest["spec"][k] for k in tuning["params"]} == tuning["params"]
    index, _ = load_index(tmp_path / "ix", use_gpu=False)
    xs, ids = x[store.rows_of(np.asarray(store.ids))], np.asarray(store.ids)  # store order = shard order
    rows, q, truth = heldout_queries(xs, 1000, K, seed=1)  # other queries than tuning's, from both shards
    np.testing.assert_array_equal(q, xs[rows])
    assert np.isin(ids[rows], np.load(version_dir(tmp_path / "ix", 1) / "shard_00001.ids.npy")).sum() > 300
    recall, _ = recall_without_self(index, q, ids[rows], ids[truth], K)
    assert recall >= TARGET  # the served index, against exact search over all vectors


@pytest.mark.parametrize("old_fields", [{}, {"merged_recall": 0.97}], ids=["before-merged", "with-merged-recall"])
def test_older_manifest_tuning_records_still_load(auto_built, tmp_path, old_fields):
    """Indexes published before the merged tuning have no `shards`; those published between kept a copy of
    `recall` as `merged_recall`. Both load and search with their tuned parameters."""
    folder, manifest, *_ = auto_built
    shutil.copytree(folder, tmp_path / "old")
    path = version_dir(tmp_path / "old", manifest["version"]) / "manifest.json"
    old = json.loads(path.read_text())
    old["tuning"] = {k: v for k, v in old["tuning"].items() if k != "shards"} | old_fields
    path.write_text(json.dumps(old))
    index, loaded = load_index(tmp_path / "old", use_gpu=False)
    assert loaded["tuning"] == old["tuning"] and index.spec.nprobe == manifest["tuning"]["params"]["nprobe"]
    q = clustered(20, D, seed=9)
    np.testing.assert_array_equal(index.search(q, K)[1], load_index(folder, use_gpu=False)[0].search(q, K)[1])


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_target_recall_outside_unit_interval_refused(bad, auto_built):
    folder, _, x, ids, _ = auto_built
    index, _ = load_index(folder, use_gpu=False)
    with pytest.raises(RetrievalIndexError, match=r"target_recall must be in \(0, 1\]"):
        tune(index, x, ids, bad)
    if bad:
        with pytest.raises(RetrievalIndexError, match=r"target_recall must be in \(0, 1\]"):
            IndexSpec("ivfpq", target_recall=bad).validate(D)
        with pytest.raises(ConfigError, match="retrieval.target_recall"):
            RetrievalConfig(target_recall=bad).validate()


def test_config_refuses_auto_with_rolling_refresh():
    with pytest.raises(ConfigError, match="rolling refresh cannot update in place"):
        RetrievalConfig(index_kind="auto", refresh_mode="rolling").validate()
    RetrievalConfig(index_kind="auto").validate()


def test_hnsw_coarse_quantizer_becomes_exact_centroid_search(tmp_path):
    """The centroid graph only speeds up the build; the saved index searches the centroids exactly."""
    x, ids = clustered(6000, D, seed=7), ids_for(6000)
    spec = IndexSpec("ivfpq", nlist=64, pq_m=8, coarse="hnsw", nprobe=4)
    built = build_shard(spec, x, ids)
    build_from_vectors(tmp_path, spec, x, ids)
    index, _ = load_index(tmp_path, use_gpu=False)
    ivf = faiss.extract_index_ivf(index.shards[0])
    quantizer = faiss.downcast_index(ivf.quantizer)
    assert isinstance(quantizer, faiss.IndexFlat) and quantizer.ntotal == 64
    q = clustered(50, D, seed=8)
    coarse = q @ quantizer.reconstruct_n(0, 64).T
    lists = np.argsort(-coarse, axis=1, kind="stable")[:, :4]  # the exact top-nprobe lists: the reference
    _, expected = ivf.search_preassigned(q, K, lists, np.take_along_axis(coarse, lists, 1))
    np.testing.assert_array_equal(index.search(q, K)[1], expected)
    np.testing.assert_array_equal(built.search(q, K)[1], expected)  # in memory, before saving, the same
    old = faiss.index_factory(D, "IVF64_HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)  # saved before the swap
    old.train(x)
    configure(old, IndexSpec("ivfpq", nlist=64, pq_m=8, coarse="hnsw", nprobe=20))
    assert faiss.downcast_index(faiss.extract_index_ivf(old).quantizer).hnsw.efSearch == 20  # graph returns nprobe
