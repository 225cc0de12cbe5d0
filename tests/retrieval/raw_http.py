"""Raw HTTP over a loopback socket: what a careless or hostile client sends, byte for byte, with pauses."""

from __future__ import annotations

import json
import select
import socket
import time


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None, token: str | None = None,
            length: bool = True) -> bytes:
    """A request's bytes; Content-Length from `body` unless `length` is False or headers give one."""
    head = {"Host": "127.0.0.1", **({"Authorization": f"Bearer {token}"} if token else {})}
    if length and body and "Content-Length" not in (headers or {}):
        head["Content-Length"] = str(len(body))
    head.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def read_response(sock: socket.socket) -> tuple[int | None, dict | bytes | None]:
    """(status, JSON body or raw bytes) of one response; (None, None) if the server closed without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    if headers.get("content-type", "").startswith("application/json"):
        return status, json.loads(body[:n])
    return status, body[:n]


def exchange(address: tuple[str, int], pieces: bytes | list[tuple[bytes, float]],
             timeout: float = 15.0) -> tuple[int | None, dict | bytes | None]:
    """Send `pieces` (bytes, or (bytes, pause seconds after) pairs) and read one response.

    Sending stops early once the server has answered (or closed), as a client reading its socket would.
    """
    if isinstance(pieces, bytes):
        pieces = [(pieces, 0.0)]
    with socket.create_connection(address, timeout=timeout) as sock:
        for data, pause in pieces:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(data)
            except OSError:
                break
            if pause:
                time.sleep(pause)
        try:
            return read_response(sock)
        except ConnectionResetError:
            return None, None
