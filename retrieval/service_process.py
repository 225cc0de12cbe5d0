"""The index service as a child process: what a trainer or benchmark starts beside itself on one machine.

`ServiceProcess(index_dir)` runs ``python -m hybrid_pretrain.retrieval.service --port 0`` on a published
index folder, takes the URL the service prints once it listens (so no port is picked first and raced for),
waits until it answers ``/health``, and stops it on exit. A thread keeps reading the child's output, so its
logs never fill the pipe and block it; the last lines are kept for the error message if it dies.
Clusters start the service themselves; this is for runs that bring their own.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hybrid_pretrain.retrieval.client import IndexClient

TAIL_LINES = 200  # child output kept for error messages


class ServiceProcess:
    """Context manager: the service serving `index_dir` on loopback.

    `port` 0 (the default) lets the service bind a free port itself, and `url` is known once entered; a
    caller that must hand the URL out before the service starts (its index is not built yet) passes a
    port, e.g. ``base.net.free_port()``. `extra_args` go to the service's command line
    (e.g. ``["--max-wait-ms", "2"]``); `env` replaces the child's environment (e.g. to pass the token).
    """

    def __init__(self, index_dir: str | Path, port: int = 0, startup_timeout: float = 120.0,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        self.index_dir, self.port = Path(index_dir), port
        self.startup_timeout = startup_timeout
        self.extra_args, self.env = list(extra_args), dict(env) if env is not None else None
        self.proc: subprocess.Popen | None = None
        self._url = f"http://127.0.0.1:{port}" if port else ""
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        if not self._url:
            raise RuntimeError("the service's URL is known once it has started (enter the context first), or "
                               "pass port= to fix it in advance")
        return self._url

    def _read_output(self) -> None:
        """Drain the child's output for its whole life; the 'serving ... at URL' line gives the URL."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._tail.append(line.rstrip("\n"))
            if not self._listening.is_set() and line.startswith("serving ") and " at http://" in line:
                self._url = line.rsplit(" at ", 1)[1].strip()
                self._listening.set()

    def _died(self) -> RuntimeError:
        if self._reader is not None:
            self._reader.join(timeout=5)  # the last lines of a dead child
        output = "\n".join(self._tail)
        return RuntimeError(f"the index service on {self.index_dir} exited with {self.proc.returncode}: "
                            f"{output[-2000:]}")

    def __enter__(self) -> ServiceProcess:
        # --watch 0: the trainer tells it when to reload (after each refresh), so versions change only then.
        cmd = [sys.executable, "-m", "hybrid_pretrain.retrieval.service", "--index-dir", str(self.index_dir),
               "--port", str(self.port), "--watch", "0", "--cpu", *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        self._reader = threading.Thread(target=self._read_output, name="index-service-output", daemon=True)
        self._reader.start()
        deadline = time.time() + self.startup_timeout
        while not self._listening.wait(0.2):
            if self.proc.poll() is not None:
                raise self._died()
            if time.time() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"the index service on {self.index_dir} did not start within "
                                   f"{self.startup_timeout:.0f} s")
        client = IndexClient(self.url, timeout=5.0)
        try:
            while True:
                try:
                    client.health()
                    return self
                except OSError:
                    if self.proc.poll() is not None:
                        raise self._died() from None
                    if time.time() > deadline:
                        self.__exit__(None, None, None)
                        raise TimeoutError(f"the index service on {self.index_dir} did not answer /health "
                                           f"within {self.startup_timeout:.0f} s") from None
                    time.sleep(0.2)
        finally:
            client.close()

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
