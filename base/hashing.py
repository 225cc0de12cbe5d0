"""sha256 of files and of module weights (the checksums checkpoints, token shards and indexes record), and the
rolling hash of token spans that both Atlas's source filter and the passage store's document table match text by."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn


def file_sha256(path: Path) -> str:
    """Streamed sha256 of a file (4 MiB blocks, so shards of any size hash in constant memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of a module's weights (names, shapes, dtypes, values): e.g. which encoder built an index."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def token_span_hashes(ids: ArrayLike, n: int, step: int = 1) -> np.ndarray:
    """(..., L) token ids -> (..., S) uint64 hash of each n-token span along the last axis, one starting every
    `step` tokens (S = 0 when L < n). One function for every caller, so a span hashed by one matches the other's."""
    t = np.asarray(ids).astype(np.uint64)  # (..., L); a negative id wraps, it still hashes
    if t.shape[-1] < n:
        return np.zeros((*t.shape[:-1], 0), np.uint64)
    S = t.shape[-1] - n + 1  # spans when step is 1
    powers = np.uint64(1_000_003) ** np.arange(n, dtype=np.uint64)  # wraps mod 2^64: a hash, not a value
    out = np.zeros((*t.shape[:-1], len(range(0, S, step))), np.uint64)  # (..., S)
    for j in range(n):  # sum_j ids[s + j] * 1000003^j, one pass per offset: no (..., S, n) temporary
        out += t[..., j : j + S : step] * powers[j]
    return out
