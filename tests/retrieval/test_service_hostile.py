"""The index service under malformed and hostile requests, over loopback (issue 19 items 2 and 3).

Each request gets the expected 4xx with a short JSON reason and exactly one log line; slow senders are
cut off at the request deadline; connections beyond the cap get 503; and afterwards the service still
answers searches correctly. Every wait is bounded by the server's own (short) timeouts.
"""

from __future__ import annotations

import json
import logging
import socket
import threading

import numpy as np
import pytest

from hybrid_pretrain.retrieval.build import build_from_vectors
from hybrid_pretrain.retrieval.client import IndexClient
from hybrid_pretrain.retrieval.index import IndexSpec, version_dir
from hybrid_pretrain.retrieval.limits import ServiceLimits
from hybrid_pretrain.retrieval.live import LiveIndex
from hybrid_pretrain.retrieval.service import IndexServer, watch
from hybrid_pretrain.tests.retrieval.raw_http import exchange, read_response, request
from hybrid_pretrain.tests.retrieval.vectors import clustered, exact_topk, ids_for

N, D, TOKEN = 2000, 16, "s3cret"
LIMITS = ServiceLimits(max_rows=64, max_k=4096, max_results=1000, max_connections=6, request_timeout=1.0,
                       idle_timeout=2.0)
ROW = [0.1] * D
BIN = {"Content-Type": "application/octet-stream"}


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _search(body: bytes, headers: dict | None = None, token: str | None = TOKEN, path: str = "/search") -> bytes:
    return request("POST", path, body, headers, token)


# (name, raw request, expected status)
HOSTILE = [
    ("not json", _search(b"{not json"), 400),
    ("wrong dimension", _search(_json({"queries": [[1.0, 2.0]], "k": 3})), 400),
    ("k zero", _search(_json({"queries": [ROW], "k": 0})), 400),
    ("k string", _search(_json({"queries": [ROW], "k": "ten"})), 400),
    ("k numeric string", _search(_json({"queries": [ROW], "k": "3"})), 400),
    ("k true", _search(b'{"queries": [[' + b",".join([b"0.1"] * D) + b']], "k": true}'), 400),
    ("k float", _search(_json({"queries": [ROW], "k": 3.0})), 400),
    ("k Infinity", _search(b'{"queries": [[' + b",".join([b"0.1"] * D) + b']], "k": Infinity}'), 400),
    ("k 400 digits", _search(b'{"queries": [[' + b",".join([b"0.1"] * D) + b']], "k": ' + b"9" * 400 + b"}"), 400),
    ("k above index size", _search(_json({"queries": [ROW], "k": N + 1})), 400),
    ("NaN query", _search(b'{"queries": [[' + b",".join([b"NaN"] * D) + b']], "k": 1}'), 400),
    ("number of 400 digits", _search(b'{"queries": [[' + b",".join([b"1" * 400] * D) + b']], "k": 1}'), 400),
    ("beyond float32", _search(_json({"queries": [[1e39] * D], "k": 1})), 400),
    ("string values", _search(_json({"queries": [["0.1"] * D], "k": 1})), 400),
    ("boolean values", _search(_json({"queries": [[True] * D], "k": 1})), 400),
    ("null values", _search(_json({"queries": [[None] * D], "k": 1})), 400),
    ("ragged rows", _search(_json({"queries": [ROW, ROW[:-1]], "k": 1})), 400),
    ("empty queries", _search(_json({"queries": [], "k": 1})), 400),
    ("array body", _search(_json([1, 2])), 400),
    ("deep nesting", _search(b"[" * 15000 + b"]" * 15000), 400),
    ("too many rows", _search(_json({"queries": [[0.0] * D] * 65, "k": 1})), 413),
    ("rows x k over the cap", _search(_json({"queries": [ROW] * 40, "k": 30})), 413),
    ("binary ragged", _search(b"\x00" * 7, BIN, path="/search?k=3"), 400),
    ("binary NaN", _search(np.full((1, D), np.nan, "<f4").tobytes(), BIN, path="/search?k=3"), 400),
    ("binary k word", _search(np.zeros((1, D), "<f4").tobytes(), BIN, path="/search?k=x"), 400),
    ("binary k exponent", _search(np.zeros((1, D), "<f4").tobytes(), BIN, path="/search?k=1e3"), 400),
    ("binary k negative", _search(np.zeros((1, D), "<f4").tobytes(), BIN, path="/search?k=-1"), 400),
    ("binary k twice", _search(np.zeros((1, D), "<f4").tobytes(), BIN, path="/search?k=1&k=2"), 400),
    ("binary k missing", _search(np.zeros((1, D), "<f4").tobytes(), BIN), 400),
    ("binary oversized", _search(np.zeros((65, D), "<f4").tobytes(), BIN, path="/search?k=1"), 413),
    ("declared 10 MB, nothing sent", request("POST", "/search", b"", {"Content-Length": "10000000"}, TOKEN), 413),
    ("Content-Length not a number", request("POST", "/search", b"", {"Content-Length": "abc"}, TOKEN), 400),
    ("two Content-Lengths", request("POST", "/search", b"{}", {"Content-Length": "2\r\nContent-Length: 2"}, TOKEN),
     400),
    ("no Content-Length", request("POST", "/search", b"", None, TOKEN, length=False), 411),
    ("chunked body", request("POST", "/search", b"", {"Transfer-Encoding": "chunked"}, TOKEN), 411),
    ("unsupported content type", _search(b"hello", {"Content-Type": "text/plain"}), 415),
    ("no token", _search(_json({"queries": [ROW], "k": 1}), token=None), 401),
    ("wrong token", _search(_json({"queries": [ROW], "k": 1}), token="s3cre7"), 401),
    ("wrong scheme", _search(_json({"queries": [ROW], "k": 1}), {"Authorization": f"Basic {TOKEN}"}, None), 401),
    ("wrong token, body never sent", request("POST", "/search", b"", {"Content-Length": "4000"}, "nope"), 401),
    ("reload without token", request("POST", "/reload", b"", None, None), 401),
    ("unknown path", request("GET", "/nope", token=TOKEN), 404),
    ("GET on search", request("GET", "/search", token=TOKEN), 405),
    ("POST on health", request("POST", "/health", b"{}", None, TOKEN), 405),
    ("DELETE", request("DELETE", "/stats", token=TOKEN), 405),
    ("garbage request line", b"HELLO\r\n\r\n", 400),
    ("HTTP/9.9", b"GET /health HTTP/9.9\r\n\r\n", 400),
    ("header line too long", request("GET", "/health", headers={"X-Big": "a" * 70000}), 431),
    ("too many headers", request("GET", "/health", headers={f"X-H{i}": "1" for i in range(120)}), 431),
    ("request line too long", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    ("Expect 100-continue with a wrong token",
     request("POST", "/search", b"", {"Content-Length": "100", "Expect": "100-continue"}, "nope"), 401),
]


@pytest.fixture
def served(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hybrid_pretrain.retrieval.service")
    x, ids = clustered(N, D), ids_for(N)
    build_from_vectors(tmp_path, IndexSpec("flat"), x, ids, shards=2)
    live = LiveIndex(tmp_path, use_gpu=False)
    with IndexServer(live, token=TOKEN, limits=LIMITS) as server:
        yield server, x, ids, tmp_path


def _still_serves(server, x, ids) -> None:
    q = clustered(5, D, seed=9)
    got = IndexClient(server.url, token=TOKEN).search(q, 4)[1]
    np.testing.assert_array_equal(got, exact_topk(x, ids, q, 4)[1])


def test_hostile_requests_get_4xx_with_a_reason_and_one_log_line(served, caplog, capfd):
    server, x, ids, _ = served
    address = server.httpd.server_address[:2]
    assert len(HOSTILE) >= 30
    for name, raw, status in HOSTILE:
        before = len(caplog.records)
        got, body = exchange(address, raw)
        assert got == status, (name, got, body)
        assert isinstance(body, dict) and 0 < len(body["error"]) < 300, (name, body)
        assert len(caplog.records) - before == 1, (name, [r.getMessage() for r in caplog.records[before:]])
        assert str(status) in caplog.records[-1].getMessage()
    assert server.httpd.counters["rejected"] == len(HOSTILE)
    assert "Traceback" not in capfd.readouterr().err
    _still_serves(server, x, ids)


def test_slow_senders_are_cut_off_at_the_request_deadline(served, caplog):
    server, x, ids, _ = served
    address = server.httpd.server_address[:2]
    head = request("POST", "/search", b"", {"Content-Length": str(4 * D), **BIN}, TOKEN).replace(b"/search",
                                                                                                 b"/search?k=1")
    # Headers dripped a byte at a time: each byte arrives well within any per-read timeout, the whole never does.
    drip = [(bytes([b]), 0.15) for b in head[:20]]
    assert exchange(address, drip)[0] == 408
    # Whole headers, then a body that trickles in slower than the deadline allows.
    body = np.zeros((1, D), "<f4").tobytes()
    assert exchange(address, [(head, 0.0)] + [(body[i:i + 8], 0.2) for i in range(0, len(body), 8)])[0] == 408
    # Headers that stop halfway.
    assert exchange(address, [(head[: len(head) // 2], 0.0)])[0] == 408
    assert server.httpd.counters["timeouts"] == 3
    _still_serves(server, x, ids)


def test_disconnects_are_one_line_not_a_traceback(served, caplog, capfd):
    server, x, ids, _ = served
    address = server.httpd.server_address[:2]
    for raw in (request("POST", "/search?k=1", b"\x00" * 16, {"Content-Length": str(4 * D), **BIN}, TOKEN),
                request("GET", "/health")[:10]):
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(raw)  # a body cut short, or half a request line, then gone
    # a client that asks for a big answer and closes without reading it
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request("POST", "/search", _json({"queries": [ROW] * 40, "k": 25}), None, TOKEN))
    _still_serves(server, x, ids)
    assert "Traceback" not in capfd.readouterr().err
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_connections_beyond_the_cap_get_503_and_idle_ones_are_closed(served):
    server, x, ids, _ = served
    address = server.httpd.server_address[:2]
    idle = [socket.create_connection(address, timeout=10) for _ in range(LIMITS.max_connections)]
    try:
        for sock in idle:  # every slot answers once, then waits idle on its kept-alive connection
            sock.sendall(request("GET", "/health"))
            assert read_response(sock)[0] == 200
        with socket.create_connection(address, timeout=10) as extra:  # answered at once, before it sends anything
            status, body = read_response(extra)
        assert status == 503 and "too many connections" in body["error"]
        assert server.httpd.refused == 1
        for sock in idle:  # the server closes each idle connection after idle_timeout, freeing its slot
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    _still_serves(server, x, ids)


def test_k_is_never_above_the_index_size(tmp_path):
    x, ids = clustered(10, D), ids_for(10)
    build_from_vectors(tmp_path, IndexSpec("flat"), x, ids)
    with IndexServer(LiveIndex(tmp_path, use_gpu=False), limits=LIMITS) as server:
        status, body = exchange(server.httpd.server_address[:2], request(
            "POST", "/search", _json({"queries": [ROW], "k": 11})))
        assert status == 400 and "holds 10 vectors" in body["error"]
        assert IndexClient(server.url).search(x[:2], 10)[1].shape == (2, 10)


def test_watch_skips_a_corrupt_version_and_keeps_serving(served, caplog):
    server, x, ids, index_dir = served
    live = server.live
    build_from_vectors(index_dir, IndexSpec("flat"), clustered(N, D, seed=5), ids, shards=2)
    shard = version_dir(index_dir, 2) / "shard_00001.faiss"
    shard.write_bytes(shard.read_bytes()[:100])  # a corrupt shard in the new version
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(live, 0.05, stop))
    watcher.start()
    try:
        for _ in range(100):  # bounded wait for the watcher to have tried version 2 several times
            if 2 in live.rejected:
                break
            stop.wait(0.05)
        stop.wait(0.3)
        assert live.version == 1 and 2 in live.rejected
        _still_serves(server, x, ids)
        skipped = [r for r in caplog.records if "reload skipped" in r.getMessage()]
        assert len(skipped) == 1 and "version 2" in skipped[0].getMessage()
        x3 = clustered(N, D, seed=6)
        build_from_vectors(index_dir, IndexSpec("flat"), x3, ids, shards=2)
        for _ in range(100):
            if live.version == 3:
                break
            stop.wait(0.05)
        assert live.version == 3
        _still_serves(server, x3, ids)
    finally:
        stop.set()
        watcher.join(timeout=10)
    status, body = exchange(server.httpd.server_address[:2], request("POST", "/reload", b"", None, TOKEN))
    assert status == 200 and body["version"] == 3
