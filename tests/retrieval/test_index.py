"""FAISS indexes: exactness, ANN recall on clustered data, sharding, persistence, removal."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_pretrain.retrieval.index import (
    IndexSpec,
    RetrievalIndexError,
    ShardedIndex,
    build_shard,
    configure,
    current_version,
    load_index,
    publish,
    staging_dir,
)
from hybrid_pretrain.tests.retrieval.vectors import clustered, exact_topk, ids_for, recall_at_k

N, D, K = 8000, 32, 10


@pytest.fixture(scope="module")
def data():
    x, ids, q = clustered(N), ids_for(N), clustered(200, seed=7)
    return x, ids, q, exact_topk(x, ids, q, K)


def test_flat_is_exact(data):
    x, ids, q, (ts, tids) = data
    s, i = ShardedIndex(IndexSpec("flat"), [build_shard(IndexSpec("flat"), x, ids)]).search(q, K)
    np.testing.assert_array_equal(i, tids)
    np.testing.assert_allclose(s, ts, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,floor", [
    (IndexSpec("ivfpq", nlist=64, pq_m=8, nprobe=16), 0.5),
    (IndexSpec("ivfpq", nlist=64, pq_m=8, nprobe=16, refine=True, refine_k_factor=10), 0.95),
    (IndexSpec("ivfpq", nlist=64, pq_m=32, pq_bits=4, fast_scan=True, nprobe=16, refine=True, refine_k_factor=16),
     0.95),
    (IndexSpec("hnsw", hnsw_m=32, ef_search=128), 0.9),
])
def test_ann_recall_vs_flat(data, spec, floor):
    x, ids, q, (_, tids) = data
    _, i = ShardedIndex(spec, [build_shard(spec, x, ids)]).search(q, K)
    assert recall_at_k(i, tids) >= floor
    assert set(np.unique(i)) <= set(ids)  # ids, never row numbers


def test_ivfpq_recall_rises_with_nprobe(data):
    x, ids, q, (_, tids) = data
    spec = IndexSpec("ivfpq", nlist=64, pq_m=16, nprobe=1)
    shard = build_shard(spec, x, ids)
    recalls = []
    for nprobe in (1, 64):
        spec.nprobe = nprobe
        configure(shard, spec)
        recalls.append(recall_at_k(ShardedIndex(spec, [shard]).search(q, K)[1], tids))
    assert recalls[1] > recalls[0]
    assert recalls[1] >= 0.6


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "ivfpq-fast-scan", "hnsw"])
def test_sharded_save_load_equals_unsharded(tmp_path, data, kind):
    x, ids, q, _ = data
    fast_scan = kind.endswith("fast-scan")
    spec = IndexSpec(kind.removesuffix("-fast-scan"), nlist=16, pq_m=8, pq_bits=4, fast_scan=fast_scan, nprobe=16)
    whole = ShardedIndex(spec, [build_shard(spec, x, ids)])
    parts = np.array_split(np.arange(N), 3)
    sharded = ShardedIndex(spec, [build_shard(spec, x[p], ids[p]) for p in parts])
    staging_dir(tmp_path, 1).mkdir()
    publish(tmp_path, 1, {"spec": vars(spec), "shards": sharded.save_shards(staging_dir(tmp_path, 1))})
    loaded, manifest = load_index(tmp_path)
    assert current_version(tmp_path) == 1 and loaded.ntotal == N and len(manifest["shards"]) == 3
    s1, i1 = sharded.search(q, K)
    s2, i2 = loaded.search(q, K)
    np.testing.assert_array_equal(i1, i2)  # reload is bit-exact
    if kind == "flat":  # exact search: 3 shards merged == one index
        sw, iw = whole.search(q, K)
        np.testing.assert_array_equal(i1, iw)
        np.testing.assert_allclose(s1, sw, rtol=1e-5)


def test_corrupt_shard_is_named(tmp_path, data):
    x, ids, _, _ = data
    spec = IndexSpec("flat")
    staging_dir(tmp_path, 1).mkdir()
    shards = ShardedIndex(spec, [build_shard(spec, x[:100], ids[:100])]).save_shards(staging_dir(tmp_path, 1))
    folder = publish(tmp_path, 1, {"spec": vars(spec), "shards": shards})
    with open(folder / "shard_00000.faiss", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\xff\xff\xff")
    with pytest.raises(RetrievalIndexError, match="shard_00000.faiss: sha256"):
        load_index(tmp_path)


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_remove_and_add(data, kind):
    x, ids, q, _ = data
    spec = IndexSpec(kind, nlist=16, pq_m=8, pq_bits=4, nprobe=16)
    index = ShardedIndex(spec, [build_shard(spec, x[:4000], ids[:4000]), build_shard(spec, x[4000:], ids[4000:])])
    _, before = index.search(x[:5], 1)
    assert index.remove(ids[:5]) == 5 and index.ntotal == N - 5
    _, after = index.search(x[:5], K)
    assert not np.isin(ids[:5], after).any()
    index.add(x[:5], ids[:5])
    _, back = index.search(x[:5], 1)
    np.testing.assert_array_equal(back, before)


def test_hnsw_refine_and_fast_scan_refuse_removal(data):
    x, ids, _, _ = data
    for spec in (IndexSpec("hnsw"), IndexSpec("ivfpq", nlist=16, pq_m=8, pq_bits=4, refine=True),
                 IndexSpec("ivfpq", nlist=16, pq_m=8, pq_bits=4, fast_scan=True)):
        index = ShardedIndex(spec, [build_shard(spec, x, ids)])
        with pytest.raises(RetrievalIndexError, match="cannot remove ids"):
            index.remove(ids[:1])


def test_bad_spec_and_queries(data):
    x, ids, _, _ = data
    with pytest.raises(RetrievalIndexError, match="index.kind"):
        build_shard(IndexSpec("lsh"), x, ids)
    with pytest.raises(RetrievalIndexError, match="pq_m"):
        build_shard(IndexSpec("ivfpq", pq_m=5), x, ids)
    with pytest.raises(RetrievalIndexError, match="fast_scan needs kind ivfpq with pq_bits 4"):
        build_shard(IndexSpec("ivfpq", pq_m=8, fast_scan=True), x, ids)  # pq_bits left at 8
    index = ShardedIndex(IndexSpec("flat"), [build_shard(IndexSpec("flat"), x[:10], ids[:10])])
    with pytest.raises(RetrievalIndexError, match=r"shape \(n, 32\)"):
        index.search(np.zeros((2, 5), np.float32), 1)
