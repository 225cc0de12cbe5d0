"""sha256 of files and of module weights (the checksums checkpoints, token shards and indexes record), and the
rolling hash of token spans that both Atlas's source filter and the passage store's document table match text by."""

from __future__ import annotations

import hashlib
import weakref
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


_FROZEN: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def weights_fingerprint(module: nn.Module) -> str:
    """`state_dict_sha256`, hashed once while the module is frozen (no parameter requires grad): a frozen passage
    tower is fingerprinted at every refresh check, ~0.6 s at 100M parameters for the same answer each time.

    The cache is keyed by every state tensor's identity, storage address and version counter, which any in-place
    write through the tensor (`load_state_dict`, `copy_` under no_grad) bumps; a write through ``.data`` does not,
    which is why a trainable module (optimizers and DeepSpeed write through ``.data``) is hashed on every call.
    """
    state = module.state_dict(keep_vars=True)  # the tensors themselves: detached copies have their own identity
    if any(p.requires_grad for p in module.parameters()) or any(t.is_inference() for t in state.values()):
        _FROZEN.pop(module, None)
        return state_dict_sha256(module)
    key = tuple((name, id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype) for name, t in state.items())
    hit = _FROZEN.get(module)
    if hit is None or hit[0] != key:
        hit = _FROZEN[module] = (key, state_dict_sha256(module))
    return hit[1]


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
