"""Client of the index service: the same `search(queries, k) -> (scores, ids)` as an in-process index.

Uses one keep-alive HTTP connection per thread (http.client is not thread-safe) and the binary
search payload, so a trainer rank pays one round trip and no JSON float parsing per batch.
"""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlparse

import numpy as np


class ServiceError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"index service answered {status}: {message}")
        self.status = status


class IndexClient:
    """A `Retriever` backed by a running `retrieval.service` (e.g. `IndexClient("http://127.0.0.1:8765")`)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"index service url '{url}' must look like http://host:port")
        self.host, self.port, self.timeout = parsed.hostname, parsed.port or 80, timeout
        self.token = token
        self._local = threading.local()
        self.last_version: int | None = None

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return conn

    def _request(self, method: str, path: str, body: bytes = b"", ctype: str = "application/json"):
        headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):  # a kept-alive connection the server closed fails once; retry on a fresh one
            conn = self._conn()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        if resp.status >= 400:
            try:
                msg = json.loads(data).get("error", "")
            except ValueError:
                msg = data[:200].decode(errors="replace")
            raise ServiceError(resp.status, msg)
        return resp, data

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 (n, d) -> (scores float32 (n, k), ids int64 (n, k))."""
        q = np.ascontiguousarray(queries, dtype="<f4")
        if q.ndim != 2:
            raise ValueError(f"queries must be 2-D (n, d), got shape {q.shape}")
        resp, data = self._request("POST", f"/search?k={int(k)}", q.tobytes(), "application/octet-stream")
        n = q.shape[0]
        if len(data) != n * k * 12:
            raise ServiceError(resp.status, f"answer of {len(data)} bytes; expected {n * k * 12} for {n} rows x k={k}")
        self.last_version = int(resp.getheader("X-Index-Version", "-1"))
        scores = np.frombuffer(data, "<f4", count=n * k).reshape(n, k)
        ids = np.frombuffer(data, "<i8", offset=4 * n * k).reshape(n, k)
        return scores.astype(np.float32), ids.astype(np.int64)

    def health(self) -> dict:
        return json.loads(self._request("GET", "/health")[1])

    def stats(self) -> dict:
        return json.loads(self._request("GET", "/stats")[1])

    def reload(self) -> int:
        """Ask the service to swap to the newest published version; returns the version now serving."""
        return int(json.loads(self._request("POST", "/reload")[1])["version"])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
