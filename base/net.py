"""Loopback ports for processes this machine starts itself (rendezvous of a one-node run, test launches)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now, the OS's pick.

    Another process may take it before the caller binds it; where the child can report the port it
    bound instead (``--port 0``, as the index service does), prefer that.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
