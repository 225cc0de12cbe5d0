"""How the index service holds connections: a bounded number at once, each request under a deadline.

Why the standard library's threaded server with these few lines, and not uvicorn or aiohttp: neither
bounds how long a request may take to *arrive*. uvicorn's keep-alive timeout restarts on every byte
received and its request-start timeout was never built (encode/uvicorn#157), aiohttp has none, so a
client dripping one byte a second holds a connection there as well; what the service needs on top
(a deadline per request and a connection cap answered with a clean 503) is as short here as it would
be wrapped around either. A thread per connection is cheap once connections are capped, and the
search itself already runs on one batching thread (retrieval.batcher).
"""

from __future__ import annotations

import io
import logging
import math
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer

log = logging.getLogger("hybrid_pretrain.retrieval.service")

_BUSY = b'{"error": "too many connections; retry shortly"}'
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(_BUSY)).encode() + b"\r\nConnection: close\r\n\r\n" + _BUSY)


class DeadlineSocketIO(io.RawIOBase):
    """A connection's socket as a raw stream whose reads fail with TimeoutError once `deadline` has passed.

    A per-read timeout alone would let a slow sender keep a thread forever by sending a byte just within
    it; here every read waits at most until the current request's deadline (``time.monotonic()`` seconds).
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer (memoryview)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class BoundedHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server that serves at most `max_connections` connections and answers the rest 503."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: connections wait there (in the kernel) while all slots are busy

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        super().__init__(address, handler)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0

    def process_request(self, request: socket.socket, client_address) -> None:  # noqa: ANN001 - (host, port)
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:  # noqa: ANN001
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address) -> None:  # noqa: ANN001
        """A canned 503 sent without reading anything, then close: costs the accepting thread nothing."""
        self.refused += 1
        try:
            request.setblocking(False)
            request.send(_BUSY_RESPONSE)
        except OSError:
            pass
        log.warning("%s connection refused -> 503: all %d connection slots busy", client_address[0],
                    self.max_connections)
        self.shutdown_request(request)

    def handle_error(self, request: socket.socket, client_address) -> None:  # noqa: ANN001
        """One line, never a traceback: clients that vanish mid-request are routine for an exposed service."""
        error = sys.exc_info()[1]
        log.warning("%s connection error: %s: %s", client_address[0], type(error).__name__, error)
