"""Index service: FAISS search over HTTP (standard library server), batched, versioned, swappable.

Endpoints (all answer JSON unless noted; every one but /health needs `Authorization: Bearer <token>`
when the server has a token):

    GET  /health   {"status": "ok", "version", "ntotal", "dim"}
    GET  /stats    request, query and batch counts, errors, mean batch size, uptime, manifest summary
    POST /search   JSON {"queries": [[...]], "k": 10} -> {"scores", "ids", "version"}; or a binary body of
                   float32 little-endian (n, dim) with `?k=10` -> float32 scores (n, k) then int64 ids (n, k),
                   version in the X-Index-Version header (what the client uses: no JSON float parsing)
    POST /reload   swap to the newest published version; {"version"}

Malformed requests get a 4xx naming what was wrong and the server keeps serving. It binds to
127.0.0.1 by default and refuses a non-loopback address without a token.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from hybrid_pretrain.retrieval.batcher import SearchBatcher
from hybrid_pretrain.retrieval.live import LiveIndex

MAX_BODY = 64 << 20
MAX_K = 4096
TOKEN_ENV = "RETRIEVAL_TOKEN"


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses one connection per thread
    disable_nagle_algorithm = True  # headers and body go out as two writes; Nagle + delayed ACK adds ~40 ms
    server: _Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence per-request stderr lines
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode())

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length header required")
        try:
            n = int(length)
        except ValueError as e:
            raise RequestError(400, f"Content-Length '{length}' is not an integer") from e
        if n < 0 or n > MAX_BODY:
            self.close_connection = True  # the body is not read, so the connection cannot be reused
            raise RequestError(413, f"body of {n} bytes; at most {MAX_BODY}")
        return self.rfile.read(n)

    def _authorise(self) -> None:
        token = self.server.token
        if token is None:
            return
        got = self.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise RequestError(401, "missing or wrong access token (Authorization: Bearer <token>)")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        routes = {("GET", "/health"): self._health, ("GET", "/stats"): self._stats,
                  ("POST", "/search"): self._search, ("POST", "/reload"): self._reload}
        try:
            body = self._body() if method == "POST" else b""
            handler = routes.get((method, url.path))
            if handler is None:
                known = any(p == url.path for _, p in routes)
                raise RequestError(405 if known else 404, f"{method} {url.path} is not an endpoint")
            if url.path != "/health":
                self._authorise()
            handler(body, parse_qs(url.query))
        except RequestError as e:
            self.server.count("rejected")
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - report and keep serving
            self.server.count("failed")
            self._json(500, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _health(self, body: bytes, query: dict) -> None:
        index, manifest = self.server.live.snapshot()
        self._json(200, {"status": "ok", "version": manifest["version"], "ntotal": index.ntotal, "dim": index.d})

    def _stats(self, body: bytes, query: dict) -> None:
        index, manifest = self.server.live.snapshot()
        b = dict(self.server.batcher.stats)
        b["mean_batch_queries"] = b["queries"] / b["batches"] if b["batches"] else 0.0
        keys = ("version", "refresh", "encoder_sha256", "encoder_counts", "spec", "created")
        self._json(200, {**b, **self.server.counters, "uptime_s": time.time() - self.server.started,
                         "ntotal": index.ntotal, "index": {k: manifest.get(k) for k in keys}})

    def _reload(self, body: bytes, query: dict) -> None:
        self._json(200, {"version": self.server.live.reload()})

    def _search(self, body: bytes, query: dict) -> None:
        d = self.server.live.d
        binary = self.headers.get("Content-Type", "").startswith("application/octet-stream")
        if binary:
            k = _parse_k(query.get("k", [None])[0])
            if len(body) == 0 or len(body) % (4 * d):
                raise RequestError(400, f"binary body of {len(body)} bytes is not a whole number of float32 "
                                        f"rows of dimension {d}")
            q = np.frombuffer(body, dtype="<f4").reshape(-1, d)
        else:
            try:
                req = json.loads(body)
            except ValueError as e:
                raise RequestError(400, f"body is not valid JSON ({e})") from e
            if not isinstance(req, dict) or "queries" not in req:
                raise RequestError(400, "expected a JSON object with 'queries' (list of vectors) and 'k'")
            k = _parse_k(req.get("k"))
            try:
                q = np.asarray(req["queries"], dtype=np.float32)
            except (ValueError, TypeError) as e:
                raise RequestError(400, f"'queries' must be a list of equal-length number lists ({e})") from e
            if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] != d:
                raise RequestError(400, f"'queries' must have shape (n >= 1, {d}), got {tuple(q.shape)}")
        if not np.isfinite(q).all():
            raise RequestError(400, "queries contain NaN or infinity")
        scores, ids, version = self.server.batcher.submit(q, k)
        self.server.count("searches")
        if binary:
            payload = np.ascontiguousarray(scores, "<f4").tobytes() + np.ascontiguousarray(ids, "<i8").tobytes()
            self._send(200, payload, "application/octet-stream",
                       {"X-Index-Version": version, "X-Rows": len(q), "X-K": k})
        else:
            self._json(200, {"scores": scores.tolist(), "ids": ids.tolist(), "version": version})


def _parse_k(raw: object) -> int:
    try:
        k = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise RequestError(400, f"'k' must be an integer in [1, {MAX_K}], got {raw!r}") from e
    if not 1 <= k <= MAX_K or (isinstance(raw, float) and raw != k):
        raise RequestError(400, f"'k' must be an integer in [1, {MAX_K}], got {raw!r}")
    return k


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    live: LiveIndex
    batcher: SearchBatcher
    token: str | None
    started: float
    counters: dict

    def count(self, key: str) -> None:
        with self._count_lock:
            self.counters[key] += 1


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class IndexServer:
    """The service around a LiveIndex; `start()` serves on a background thread, `url` says where."""

    def __init__(self, live: LiveIndex, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_batch: int = 256, max_wait_ms: float = 2.0) -> None:
        if not is_loopback(host) and not token:
            raise ValueError(f"refusing to serve on non-loopback address {host} without an access token")
        self.live = live
        self.httpd = _Server((host, port), _Handler)
        self.httpd.live, self.httpd.token, self.httpd.started = live, token, time.time()
        self.httpd.batcher = SearchBatcher(live, max_batch, max_wait_ms)
        self.httpd.counters = {"searches": 0, "rejected": 0, "failed": 0}
        self.httpd._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> IndexServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="index-service", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.batcher.close()

    def __enter__(self) -> IndexServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a published FAISS index folder over HTTP (see module docstring).")
    p.add_argument("--index-dir", required=True, help="folder written by launcher/build_index.py")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token-file", help=f"file holding the access token (or set ${TOKEN_ENV})")
    p.add_argument("--max-batch", type=int, default=256, help="most query rows merged into one FAISS search")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--watch", type=float, default=5.0, help="seconds between checks for a new version (0: off)")
    p.add_argument("--cpu", action="store_true", help="search on the CPU even when GPU FAISS is present")
    args = p.parse_args(argv)
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get(TOKEN_ENV)
    try:
        live = LiveIndex(args.index_dir, use_gpu=not args.cpu)
        server = IndexServer(live, args.host, args.port, token, args.max_batch, args.max_wait_ms)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.start()
    print(f"serving {args.index_dir} version {live.version} ({live.snapshot()[0].ntotal} vectors) at {server.url}")
    try:
        while True:
            time.sleep(args.watch or 3600)
            if args.watch:
                live.reload()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
