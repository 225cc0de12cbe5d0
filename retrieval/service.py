"""Index service: FAISS search over HTTP, batched, versioned, swappable, and built to be exposed.

Endpoints (all answer JSON unless noted; every one but /health needs `Authorization: Bearer <token>`
when the server has a token):

    GET  /health   {"status": "ok", "version", "ntotal", "dim"}
    GET  /stats    request, query and batch counts, errors, mean batch size, uptime, manifest summary
    POST /search   JSON {"queries": [[...]], "k": 10} -> {"scores", "ids", "version"}; or a binary body of
                   float32 little-endian (n, dim) with `?k=10` -> float32 scores (n, k) then int64 ids (n, k),
                   version in the X-Index-Version header (what the client uses: no JSON float parsing)
    POST /reload   swap to the newest published version; {"version"}

Against careless or hostile clients (bounds in retrieval.limits, connections in retrieval.connections):
at most `max_connections` connections (more get 503), each request must arrive within
`request_timeout` seconds (408) and an idle kept-alive connection closes after `idle_timeout`; the token
is checked before the body is read (401); body, rows, k (never above the index size) and rows x k are
bounded (413/400). Every client error is a 4xx with a short JSON reason and one log line; a client
that disconnects is one log line, never a traceback. A new version that fails to load is logged and
skipped while the old one keeps serving. It binds to 127.0.0.1 by default and refuses a non-loopback
address without a token, which comes from `--token-file` or $RETRIEVAL_TOKEN and is never written down.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import faiss
import numpy as np

from hybrid_pretrain.retrieval.auth import TOKEN_ENV, bearer_matches, read_token
from hybrid_pretrain.retrieval.batcher import SearchBatcher
from hybrid_pretrain.retrieval.connections import BoundedHTTPServer, DeadlineSocketIO, log
from hybrid_pretrain.retrieval.errors import AccessTokenError, RetrievalIndexError
from hybrid_pretrain.retrieval.limits import (
    RequestError,
    ServiceLimits,
    check_k,
    parse_binary,
    parse_json,
    parse_k_text,
)
from hybrid_pretrain.retrieval.live import LiveIndex

ROUTES = {"/health": ("GET", "_health"), "/stats": ("GET", "_stats"), "/search": ("POST", "_search"),
          "/reload": ("POST", "_reload")}
SMALL_BODY = 4096  # /reload takes no body; a little is tolerated
LINGER_S, LINGER_READS = 0.5, 16  # after an error: drop at most 16 x 64 KiB of unread input for at most 0.5 s
BINARY = "application/octet-stream"


class _Disconnected(Exception):
    """The client went away mid-request; there is nobody to answer."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses one connection per thread
    disable_nagle_algorithm = True  # headers and body go out as two writes; Nagle + delayed ACK adds ~40 ms
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._io = DeadlineSocketIO(self.connection)
        self.rfile = io.BufferedReader(self._io, 1 << 16)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - no per-request line; errors log in _fail
        pass

    def handle_one_request(self) -> None:
        """Wait (idle_timeout) for a request, then read and answer it whole within request_timeout."""
        limits = self.server.limits
        self.command, self.path, self.requestline = "-", "-", ""
        self._io.deadline = time.monotonic() + limits.idle_timeout
        try:
            if not self.rfile.peek(1):  # the client closed its kept-alive connection
                self.close_connection = True
                return
        except OSError:  # idle too long (TimeoutError) or reset: close without a word
            self.close_connection = True
            return
        self._io.deadline = time.monotonic() + limits.request_timeout
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self._fail(RequestError(414, "request line longer than 65536 bytes"))
            elif self.parse_request():  # else it answered through send_error
                self._dispatch()
        except TimeoutError:
            self.server.count("timeouts")
            self._fail(RequestError(408, f"request did not arrive whole within {limits.request_timeout:g} s"))
        except (_Disconnected, ConnectionError) as e:
            self.close_connection = True
            self.server.count("disconnects")
            log.info("%s %s %.80r: client disconnected (%s)", self.client_address[0], self.command, self.path,
                     type(e).__name__)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (malformed request line or headers) as JSON, like ours; always a 4xx."""
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code, message = 400, f"unsupported HTTP version; expected HTTP/1.0 or HTTP/1.1 ({message})"
        self._fail(RequestError(code, message or HTTPStatus(code).phrase))

    def handle_expect_100(self) -> bool:
        """Refuse before the client sends its body (``Expect: 100-continue``) when the request is bad anyway."""
        try:
            self._check_route_and_token()
        except RequestError as e:
            self._fail(e)
            return False
        return super().handle_expect_100()

    def _fail(self, error: RequestError) -> None:
        """Answer `error` as JSON, log one line and close (a body may be left unread on the connection)."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # http.server omits the status line for what it took for HTTP/0.9
        self.server.count("failed" if error.status >= 500 else "rejected")
        log.warning("%s %s %.80r -> %d: %s", self.client_address[0], self.command, self.path, error.status, error)
        try:
            self._send(error.status, json.dumps({"error": str(error)}).encode())
            self._linger()
        except OSError:
            pass

    def _linger(self) -> None:
        """Read and drop (briefly, boundedly) what the client is still sending before the close, so the answer
        is not lost to the reset a close with unread input causes."""
        self.connection.shutdown(socket.SHUT_WR)
        self._io.deadline = min(self._io.deadline, time.monotonic() + LINGER_S)
        for _ in range(LINGER_READS):
            if not self.rfile.read1(1 << 16):
                break

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        self.connection.settimeout(self.server.limits.request_timeout)  # a client that stops reading gets cut off
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode())

    def _check_route_and_token(self) -> str:
        """The handler's name for this method and path, once the token is right (nothing read yet)."""
        path = urlsplit(self.path).path
        if path not in ROUTES:
            raise RequestError(404, f"{path[:60]!r} is not an endpoint (one of {', '.join(ROUTES)})")
        method, name = ROUTES[path]
        if self.command != method:
            raise RequestError(405, f"{path} takes {method}, not {self.command[:10]!r}")
        token = self.server.token
        if path != "/health" and token is not None and not bearer_matches(self.headers.get("Authorization"), token):
            raise RequestError(401, "missing or wrong access token (Authorization: Bearer <token>)")
        return name

    def _dispatch(self) -> None:
        try:
            name = self._check_route_and_token()
            url = urlsplit(self.path)
            body = self._body(url.path == "/search") if self.command == "POST" else b""
            getattr(self, name)(body, parse_qs(url.query, max_num_fields=8))
        except RequestError as e:
            self._fail(e)
        except (_Disconnected, ConnectionError, TimeoutError):
            raise
        except Exception as e:  # noqa: BLE001 - a server fault answers 500 and the service keeps serving
            self._fail(RequestError(500, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))

    def _content_type(self) -> str:
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip().lower()
        if ctype not in (BINARY, "application/json"):
            raise RequestError(415, f"Content-Type {ctype[:40]!r}; expected {BINARY} or application/json")
        return ctype

    def _body(self, search: bool) -> bytes:
        """The body, read only once its declared length fits what this endpoint can need."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths and not search:
            return b""  # no length and no chunking: an empty body (RFC 9112)
        if len(lengths) != 1:
            raise RequestError(411 if not lengths else 400, "expected exactly one Content-Length header")
        if not lengths[0].strip().isdigit() or len(lengths[0].strip()) > 12:
            raise RequestError(400, f"Content-Length {lengths[0][:20]!r} is not a byte count")
        n = int(lengths[0])
        limit = SMALL_BODY
        if search:
            limit = self.server.limits.max_body(self._content_type() == BINARY, self.server.live.d)
        if n > limit:
            raise RequestError(413, f"body of {n} bytes; at most {limit} here (--max-rows "
                                    f"{self.server.limits.max_rows} of dimension {self.server.live.d})")
        body = self.rfile.read(n)
        if len(body) < n:
            raise _Disconnected()
        return body

    def _health(self, body: bytes, query: dict) -> None:
        index, manifest = self.server.live.snapshot()
        self._json(200, {"status": "ok", "version": manifest["version"], "ntotal": index.ntotal, "dim": index.d})

    def _stats(self, body: bytes, query: dict) -> None:
        index, manifest = self.server.live.snapshot()
        b = dict(self.server.batcher.stats)
        b["mean_batch_queries"] = b["queries"] / b["batches"] if b["batches"] else 0.0
        keys = ("version", "refresh", "encoder_sha256", "encoder_counts", "spec", "created")
        self._json(200, {**b, **self.server.counters, "refused": self.server.refused,
                         "uptime_s": time.time() - self.server.started, "ntotal": index.ntotal,
                         "index": {k: manifest.get(k) for k in keys}})

    def _reload(self, body: bytes, query: dict) -> None:
        try:
            self._json(200, {"version": self.server.live.reload()})
        except RetrievalIndexError as e:  # the new version is broken; the old one keeps serving
            raise RequestError(503, str(e)) from None

    def _search(self, body: bytes, query: dict) -> None:
        index, _ = self.server.live.snapshot()
        limits = self.server.limits
        binary = self._content_type() == BINARY
        if binary:
            k, q = parse_k_text(query.get("k")), parse_binary(body, index.d)
        else:
            q, k = parse_json(body, index.d, limits)
        if len(q) > limits.max_rows:
            raise RequestError(413, f"{len(q)} query rows; at most {limits.max_rows} per request")
        check_k(k, len(q), index.ntotal, limits)
        try:
            scores, ids, version = self.server.batcher.submit(q, k)
        except TimeoutError:
            raise RequestError(503, "the search queue did not drain in time; retry shortly") from None
        self.server.count("searches")
        if binary:
            payload = np.ascontiguousarray(scores, "<f4").tobytes() + np.ascontiguousarray(ids, "<i8").tobytes()
            self._send(200, payload, BINARY, {"X-Index-Version": version, "X-Rows": len(q), "X-K": k})
        else:
            self._json(200, {"scores": scores.tolist(), "ids": ids.tolist(), "version": version})


class _Server(BoundedHTTPServer):
    live: LiveIndex
    batcher: SearchBatcher
    token: str | None
    limits: ServiceLimits
    started: float

    def setup_state(self, live: LiveIndex, batcher: SearchBatcher, token: str | None, limits: ServiceLimits) -> None:
        self.live, self.batcher, self.token, self.limits = live, batcher, token, limits
        self.started = time.time()
        self.counters = {"searches": 0, "rejected": 0, "failed": 0, "timeouts": 0, "disconnects": 0}
        self._count_lock = threading.Lock()

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
                 max_batch: int = 256, max_wait_ms: float = 2.0, limits: ServiceLimits | None = None,
                 search_threads: int = 1) -> None:
        if not is_loopback(host) and not token:
            raise ValueError(f"refusing to serve on non-loopback address {host} without an access token")
        limits = limits or ServiceLimits()
        limits.validate()
        self.live = live
        self.httpd = _Server((host, port), _Handler, limits.max_connections)
        self.httpd.setup_state(live, SearchBatcher(live, max_batch, max_wait_ms, search_threads), token, limits)
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


def watch(live: LiveIndex, every: float, stop: threading.Event | None = None) -> None:
    """Reload every `every` seconds until `stop`; a version that fails to load is logged once and skipped."""
    stop = stop or threading.Event()
    last_problem = ""
    while not stop.wait(every):
        before = live.version
        try:
            if live.reload() != before:
                log.info("serving version %d (%d vectors)", live.version, live.snapshot()[0].ntotal)
        except RetrievalIndexError as e:
            if str(e) != last_problem:
                log.warning("reload skipped: %s", e)
            last_problem = str(e)


def main(argv: list[str] | None = None) -> int:
    d = ServiceLimits()
    p = argparse.ArgumentParser(description="Serve a published FAISS index folder over HTTP (see module docstring).")
    p.add_argument("--index-dir", required=True, help="folder written by launcher/build_index.py")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed)")
    p.add_argument("--token-file", help=f"file holding the access token (or set ${TOKEN_ENV}); never written anywhere")
    p.add_argument("--max-batch", type=int, default=256, help="most query rows merged into one FAISS search")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--watch", type=float, default=5.0, help="seconds between checks for a new version (0: off)")
    p.add_argument("--cpu", action="store_true", help="search on the CPU even when GPU FAISS is present")
    p.add_argument("--search-threads", type=int, default=0,
                   help="batches searched at once (default: the CPU count on CPU FAISS, 1 on GPUs)")
    p.add_argument("--max-rows", type=int, default=d.max_rows, help=f"query rows per request (default {d.max_rows})")
    p.add_argument("--max-k", type=int, default=d.max_k, help=f"results per query, at most (default {d.max_k})")
    p.add_argument("--max-results", type=int, default=d.max_results,
                   help=f"rows x k per request, at most (default {d.max_results})")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"connections served at once; more are answered 503 (default {d.max_connections})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help=f"seconds for a whole request to arrive (default {d.request_timeout:g})")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help=f"seconds an idle kept-alive connection stays open (default {d.idle_timeout:g})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    limits = ServiceLimits(args.max_rows, args.max_k, args.max_results, args.max_connections, args.request_timeout,
                           args.idle_timeout)
    try:
        token = read_token(args.token_file)
        live = LiveIndex(args.index_dir, use_gpu=not args.cpu)
        on_gpu = not args.cpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        search_threads = args.search_threads or (1 if on_gpu else os.cpu_count() or 1)
        server = IndexServer(live, args.host, args.port, token, args.max_batch, args.max_wait_ms, limits,
                             search_threads)
    except (ValueError, OSError, AccessTokenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.start()
    print(f"serving {args.index_dir} version {live.version} ({live.snapshot()[0].ntotal} vectors) at {server.url}",
          flush=True)
    try:
        if args.watch:
            watch(live, args.watch)
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
