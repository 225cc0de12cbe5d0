"""One builder at a time per index folder: an exclusive ``flock`` on ``<index_dir>/.build.lock``.

Two builders on one folder would compute the same next version, share its staging folder and could
delete the version ``CURRENT`` points at. The lock is held from choosing the version to publishing it;
the kernel releases it when the holder exits, so a crashed builder never leaves the folder locked.
Whoever holds it may also clear what a crashed builder left behind (``clear_leftovers``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from hybrid_pretrain.retrieval.errors import RetrievalIndexError

LOCK_FILE = ".build.lock"


class BuildLock:
    """``with BuildLock(index_dir):`` publish versions; a second holder gets RetrievalIndexError at once."""

    def __init__(self, index_dir: str | Path) -> None:
        self.index_dir = Path(index_dir)
        self.path = self.index_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> BuildLock:
        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RetrievalIndexError(f"index folder {self.index_dir} is being built by another process (pid "
                                      f"{holder} holds {self.path}); wait for it to finish or build into another "
                                      "folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clear_leftovers(index_dir: str | Path, current: int | None) -> None:
    """Remove staging folders and versions newer than `current`: a crashed builder's, never published.

    Only the lock's holder may call this; readers only ever open the version CURRENT names (or older).
    """
    for path in Path(index_dir).glob("v[0-9]*"):
        if not path.is_dir():
            continue
        number = path.name[1:].split(".", 1)[0]
        unpublished = path.name.endswith(".staging") or (number.isdigit() and int(number) > (current or 0))
        if unpublished:
            shutil.rmtree(path, ignore_errors=True)
