"""Measured memory on CPU, to hold ``training.memory``'s shape-only estimate against.

Two measurements:

- ``saved_bytes(fn)``: bytes of the tensors autograd keeps for backward while fn runs its forward,
  each storage once, parameters excluded (what activation checkpointing trades for recompute).
- ``peak_rss_growth(fn)``: how far the process's resident memory peaks above where it started while
  fn runs (forward, backward, everything). Linux: the kernel's high-water mark (VmHWM) is reset to the
  current RSS first (``/proc/self/clear_refs``), and glibc is told to serve every allocation of 64 KiB
  or more with its own mapping, which it returns to the kernel on free, so RSS follows live tensors
  instead of the allocator's cache. It is the real execution, measured by the kernel.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_rss_growth(fn: Callable[[], object]) -> int:
    """Peak resident bytes above the starting RSS while fn runs (its result is dropped first). Linux only."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)  # big blocks go straight back to the kernel when freed
    gc.collect()
    start = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    fn()
    return _status_bytes("VmHWM") - start


def saved_bytes(fn: Callable[[], object], module: nn.Module | None = None) -> int:
    """Bytes of distinct storages saved for backward while fn runs, leaving out `module`'s parameters."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
