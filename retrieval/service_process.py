"""The index service as a child process: what a trainer or benchmark starts beside itself on one machine.

`ServiceProcess(index_dir)` runs ``python -m hybrid_pretrain.retrieval.service`` on a published index
folder, waits until it answers ``/health``, and stops it on exit; `url` is what ``retrieval.service`` takes.
Clusters start the service themselves; this is for runs that bring their own.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from hybrid_pretrain.retrieval.client import IndexClient


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServiceProcess:
    """Context manager: the service serving `index_dir` on loopback `port` (default: a free one)."""

    def __init__(self, index_dir: str | Path, port: int = 0, startup_timeout: float = 120.0) -> None:
        self.index_dir, self.port = Path(index_dir), port or free_port()
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServiceProcess:
        # --watch 0: the trainer tells it when to reload (after each refresh), so versions change only then.
        cmd = [sys.executable, "-m", "hybrid_pretrain.retrieval.service", "--index-dir", str(self.index_dir),
               "--port", str(self.port), "--watch", "0", "--cpu"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        client = IndexClient(self.url, timeout=5.0)
        deadline = time.time() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                raise RuntimeError(f"the index service on {self.index_dir} exited with {self.proc.returncode}: "
                                   f"{out[-2000:]}")
            try:
                client.health()
                break
            except OSError:
                if time.time() > deadline:
                    self.__exit__(None, None, None)
                    raise TimeoutError(f"the index service on {self.index_dir} did not answer within "
                                       f"{self.startup_timeout:.0f} s") from None
                time.sleep(0.2)
        client.close()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
