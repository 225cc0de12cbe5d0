"""Index service over real loopback HTTP: concurrency, batching, malformed requests, auth, refresh under load."""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest

from hybrid_pretrain.retrieval.build import build_from_vectors
from hybrid_pretrain.retrieval.client import IndexClient, ServiceError
from hybrid_pretrain.retrieval.index import IndexSpec, ShardedIndex, build_shard, load_index
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.protocol import Retriever
from hybrid_pretrain.retrieval.service import IndexServer
from hybrid_pretrain.tests.retrieval.vectors import clustered, exact_topk, ids_for

N, D = 2000, 16


def _publish(index_dir, version, x, ids, shards=2):
    assert build_from_vectors(index_dir, IndexSpec("flat"), x, ids, shards)["version"] == version


@pytest.fixture
def served(tmp_path):
    x, ids = clustered(N, D), ids_for(N)
    _publish(tmp_path, 1, x, ids)
    live = LiveIndex(tmp_path, use_gpu=False)
    with IndexServer(live, token="s3cret", max_wait_ms=5.0) as server:
        yield server, IndexClient(server.url, token="s3cret"), x, ids, tmp_path


def _raw(server, method, path, body=b"", headers=None):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, body=body, headers={"Authorization": "Bearer s3cret", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_client_and_in_process_index_agree(served):
    server, client, x, ids, index_dir = served
    assert server.url.startswith("http://127.0.0.1:")
    local, _ = load_index(index_dir, use_gpu=False)
    assert isinstance(client, Retriever) and isinstance(local, Retriever)
    q = clustered(7, D, seed=3)
    s1, i1 = client.search(q, 5)
    s2, i2 = local.search(q, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    np.testing.assert_array_equal(i1, exact_topk(x, ids, q, 5)[1])
    assert client.health() == {"status": "ok", "version": 1, "ntotal": N, "dim": D}


def run_concurrently(worker, n: int) -> None:
    """Run worker(0..n-1) on n threads; every thread ends within 60 s and none raised."""
    errors: list = []

    def guarded(w: int) -> None:
        try:
            worker(w)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_concurrent_clients_are_batched(served):
    server, client, x, ids, _ = served
    q = clustered(64, D, seed=4)
    truth = exact_topk(x, ids, q, 3)[1]

    def worker(w: int) -> None:
        for j in range(w, 64, 8):
            np.testing.assert_array_equal(client.search(q[j : j + 1], 3)[1], truth[j : j + 1])

    run_concurrently(worker, 8)
    stats = client.stats()
    assert stats["requests"] == 64 and stats["queries"] == 64
    assert stats["batches"] < 64  # concurrent requests were merged into shared FAISS searches


def test_malformed_requests_get_4xx_and_server_keeps_serving(served):
    server, client, _, _, _ = served
    bad = [
        ("POST", "/search", b"{not json", {"Content-Type": "application/json"}, 400),
        ("POST", "/search", json.dumps({"queries": [[1.0, 2.0]], "k": 3}).encode(), {}, 400),  # wrong dim
        ("POST", "/search", json.dumps({"queries": [[0.0] * D], "k": 0}).encode(), {}, 400),
        ("POST", "/search", json.dumps({"queries": [[0.0] * D], "k": "ten"}).encode(), {}, 400),
        ("POST", "/search", json.dumps({"queries": [[float("nan")] * D], "k": 1}).encode(), {}, 400),
        ("POST", "/search", json.dumps([1, 2]).encode(), {}, 400),
        ("POST", "/search?k=3", b"\x00" * 7, {"Content-Type": "application/octet-stream"}, 400),
        ("POST", "/search?k=x", b"\x00" * 4 * D, {"Content-Type": "application/octet-stream"}, 400),
        ("GET", "/nope", b"", {}, 404),
        ("GET", "/search", b"", {}, 405),
    ]
    for method, path, body, headers, status in bad:
        got, data = _raw(server, method, path, body, headers)
        assert got == status, (path, body[:40], got, data)
        assert "error" in json.loads(data)
    status, data = _raw(server, "POST", "/search", json.dumps({"queries": [[0.1] * D], "k": 2}).encode())
    assert status == 200 and len(json.loads(data)["ids"][0]) == 2
    assert client.search(clustered(2, D), 4)[1].shape == (2, 4)
    assert client.stats()["rejected"] == len(bad)


def test_token_is_required(served):
    server, _, _, _, _ = served
    with pytest.raises(ServiceError, match="401"):
        IndexClient(server.url).search(clustered(1, D), 1)
    with pytest.raises(ServiceError, match="401"):
        IndexClient(server.url, token="wrong").stats()
    assert IndexClient(server.url).health()["status"] == "ok"  # liveness probes need no token


def test_refuses_public_bind_without_token(tmp_path):
    x, ids = clustered(10, D), ids_for(10)
    live = LiveIndex(index=ShardedIndex(IndexSpec("flat"), [build_shard(IndexSpec("flat"), x, ids)]))
    with pytest.raises(ValueError, match="non-loopback"):
        IndexServer(live, host="0.0.0.0")


def test_refresh_under_load_has_zero_failed_queries(served):
    server, client, x, ids, index_dir = served
    q = clustered(16, D, seed=5)
    stop, failures, seen = threading.Event(), [], set()

    def hammer() -> None:
        c = IndexClient(server.url, token="s3cret")
        while not stop.is_set():
            try:
                _, got = c.search(q, 3)
                assert got.shape == (16, 3) and (got >= 0).all()
                seen.add(c.last_version)
            except Exception as e:  # noqa: BLE001
                failures.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for version in (2, 3, 4):  # a newer "encoder": every version moves the vectors
        x = clustered(N, D, seed=10 + version)
        _publish(index_dir, version, x, ids)
        assert client.reload() == version
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert failures == []
    assert 4 in seen and len(seen) >= 2  # clients saw the swaps happen while they searched
    np.testing.assert_array_equal(client.search(q, 3)[1], exact_topk(x, ids, q, 3)[1])  # serving the newest
    assert client.health()["version"] == 4


def test_several_search_threads_answer_exactly(tmp_path):
    x, ids = clustered(N, D), ids_for(N)
    _publish(tmp_path, 1, x, ids)
    q = clustered(48, D, seed=8)
    truth = exact_topk(x, ids, q, 5)[1]
    with IndexServer(LiveIndex(tmp_path, use_gpu=False), search_threads=2) as server:
        assert len(server.httpd.batcher._threads) == 2

        def worker(w: int) -> None:
            client = IndexClient(server.url)
            for j in range(w, 48, 6):
                np.testing.assert_array_equal(client.search(q[j : j + 2], 5)[1], truth[j : j + 2])

        run_concurrently(worker, 6)
