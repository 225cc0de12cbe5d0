"""base/malloc.py: with freed memory kept, a loop of mid-sized temporaries stops faulting in fresh pages; with it
returned (offload runs), RSS falls back when tensors are freed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hybrid_pretrain.base.malloc import OPT_OUT, keep_freed_memory, preloaded_allocator, return_freed_memory

# An H3 SSM kernel's forward and backward, the case base/malloc.py measured: its 0.3-1 MB temporaries, made
# and dropped every call, are trimmed off the heap's top by glibc's defaults and faulted back in each time.
# Appended to a script that defines `mode` and `step()`: warm up, then print the minor page faults per step.
FAULTS_PER_STEP = """
import json, resource
for _ in range({warm}):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({steps}):
    step()
print(json.dumps({{"mode": mode, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / {steps}}}))
"""

LOOP = """
import torch
from hybrid_pretrain.base.malloc import keep_freed_memory
from hybrid_pretrain.models.mixers.ssm import DiagonalSSM
mode = keep_freed_memory()
torch.set_num_threads(1)
ssm = DiagonalSSM(256, 64)
def step():
    k = ssm.kernel(1024)
    k.backward(torch.ones_like(k))
""" + FAULTS_PER_STEP.format(warm=5, steps=20)


# 200 MB of 4 MiB blocks (below glibc's 32 MiB mmap ceiling, as DeepSpeed's partition buffers of a layer are)
# touched, freed in allocation order, then the resident growth that stays behind.
HELD_BACK = """
import json, sys, torch
from hybrid_pretrain.base import malloc
mode = getattr(malloc, sys.argv[1])()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
start = rss()
blocks = [torch.ones(1 << 20) for _ in range(50)]
blocks.clear()
print(json.dumps({"mode": mode, "held_mb": (rss() - start) / 1e6}))
"""


# Blocks above glibc's 32 MiB mmap ceiling (a (1, 8K, 1024) fp32 activation is 32 MiB): mapped afresh on every
# allocation unless mmap is off. The heap grows for the first few steps (PyTorch's 64-byte aligned blocks do not
# fit the exact hole of a freed one until neighbours coalesce), then stops.
LARGE = """
import sys, torch
from hybrid_pretrain.base import malloc
mode = getattr(malloc, sys.argv[1])()
torch.set_num_threads(1)
x = torch.ones(12 << 20)  # 48 MiB
def step():
    return (x * 2).sum()
""" + FAULTS_PER_STEP.format(warm=10, steps=10)


def run_loop(**env: str) -> dict:
    return run_script(LOOP, **env)


def run_script(script: str, *args: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (OPT_OUT, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", script, *args], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_heap_stops_page_faults_of_temporaries() -> None:
    kept, system = run_loop(), run_loop(**{OPT_OUT: "system"})
    assert kept["mode"] == "glibc, freed memory kept" and system["mode"] == "glibc defaults"
    assert system["faults"] > 1000  # measured ~4,000 per call (16 MB of fresh pages)
    assert kept["faults"] < system["faults"] / 10  # measured ~40


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, keep_freed_memory leaves large blocks mmapped")
def test_kept_heap_serves_blocks_above_the_mmap_ceiling() -> None:
    kept, returned = run_script(LARGE, "keep_freed_memory"), run_script(LARGE, "return_freed_memory")
    assert kept["mode"] == "glibc, freed memory kept" and returned["mode"] == "glibc, freed memory returned"
    assert returned["faults"] > 5000  # 48 MiB of fresh 4 KiB pages per step: ~12,300
    # measured 0 in 11 runs of 12, and one step of 10 mapped afresh in the 12th (the heap still settling)
    assert kept["faults"] < returned["faults"] / 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_returned_memory_leaves_the_process_and_kept_memory_stays() -> None:
    """What an offload run (return_freed_memory) needs: RSS falls back when its tensors are freed."""
    kept, returned = run_script(HELD_BACK, "keep_freed_memory"), run_script(HELD_BACK, "return_freed_memory")
    assert kept["mode"] == "glibc, freed memory kept" and returned["mode"] == "glibc, freed memory returned"
    assert kept["held_mb"] > 150  # the heap keeps the 210 MB for the next step
    assert returned["held_mb"] < 20


def test_preloaded_allocator_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert preloaded_allocator() == "tcmalloc"
    assert keep_freed_memory() == return_freed_memory() == "tcmalloc"
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv(OPT_OUT, "system")
    assert keep_freed_memory() == return_freed_memory() == "glibc defaults"
