"""Keep freed heap memory in the process on CPU, so tensor temporaries stop paying page faults.

glibc's malloc serves blocks above a (dynamic) threshold by ``mmap`` and gives the top of its heap back
to the OS once more than a trim threshold of it is free. A training or decoding step allocates and frees
the same mid-sized temporaries (0.1-30 MB: FFT buffers, complex products, gradients of activations) over and
over, so each step maps fresh zeroed pages and faults on every 4 KiB of them: measured on the 2-core
development VM, one H3 layer's SSM kernel at (256 channels, 32 modes, L 1K) took 16.1 ms forward and
backward with ~4,100-4,800 minor faults per call, 9.3 ms with the heap kept (~2 faults); a whole H3 layer
there ~5% less time (bench/RESULTS.md, "CPU allocator"). Setting the two
thresholds once makes freed blocks stay in the heap for the next step (``mallopt``, glibc's own knob;
what ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` would do, but from inside the process, so no
launcher has to pass environment variables to every rank). glibc caps the mmap threshold at 32 MiB, so blocks of
32 MiB and up (one (B, L, d_model) fp32 activation at d_model 1024, L 8K; a long sequence's logits) would still be
mapped and faulted in afresh each time: on a machine without a GPU, keeping memory also turns mmap off
(``M_MMAP_MAX`` 0), so those come from the heap too (with a GPU the activations are not in host memory, and the
host's large blocks are staging copies, e.g. a checkpoint's, better returned when freed). Measured: a 33.5 MB
alloc-and-copy 18.6 ms with mmap, one H3 layer fwd + bwd at d_model 1024, L 8K, batch 1 1,855-1,962 ms against
2,284-2,460 ms, attention's 6,198-6,569 against 6,519-7,393 ms (one thread).
The price is fragmentation: PyTorch asks for 64-byte aligned blocks, which do not fit the exact hole a freed block
of the same size leaves, so the heap grows for a few steps before freed neighbours coalesce (bench/train_throughput.py
at L 8K: peak RSS 2.06 GB against 1.77 GB with mmap on, 6-8% faster). A preloaded tcmalloc or jemalloc (PyTorch's CPU
tuning guide recommends them) caches freed memory itself and is left alone.

The cost: memory freed after a peak stays with the process (reused by the next step, not returned to the
OS). ``HYBRID_PRETRAIN_MALLOC=system`` keeps glibc's defaults.

A run sized to fit its RAM (ZeRO offload of a model as large as the machine takes) wants the opposite:
``return_freed_memory()``. There the held-back heap is what overflows: DeepSpeed's partitioning makes and frees
blocks of every size below glibc's 32 MiB ceiling in several arenas, and at the 2.7B offload run's peak RSS held
~3.9 GiB more than its live tensors (1.39B: 2.4 GiB; 0.85 GiB with each block of 1 MiB and up mapped on its own,
the same as with jemalloc), while its 70-100 s steps wait on NVMe and CPU Adam, not on page faults.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc <malloc.h>
MMAP_THRESHOLD_MAX = 32 << 20  # glibc ignores a larger mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
KEEP_ALL = 2**31 - 1  # trim threshold: never give the heap's top back
NO_MMAP, DEFAULT_MMAP_MAX = 0, 65536  # how many blocks may be mmapped at once: none when memory is kept
RETURN_ABOVE = 1 << 20  # mmap threshold for memory-bound runs: blocks of 1 MiB and up unmapped when freed
RETURN_TRIM = 128 << 10  # trim threshold for memory-bound runs: glibc's default
OPT_OUT = "HYBRID_PRETRAIN_MALLOC"
PRELOADED = ("tcmalloc", "jemalloc")


def preloaded_allocator() -> str | None:
    """The name of a tcmalloc / jemalloc this process was started with (``LD_PRELOAD``), else None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in PRELOADED if name in preload), None)


def keep_freed_memory() -> str:
    """Tune glibc's malloc to keep freed memory (see the module docstring); returns what the process now uses.

    One of "tcmalloc" / "jemalloc" (preloaded, untouched), "glibc, freed memory kept", "glibc defaults"
    (``HYBRID_PRETRAIN_MALLOC=system``, or not Linux / glibc). Safe to call more than once.
    """
    mmap_max = DEFAULT_MMAP_MAX if torch.cuda.is_available() else NO_MMAP  # CPU compute: large blocks kept too
    return _set_glibc(MMAP_THRESHOLD_MAX, KEEP_ALL, mmap_max, "glibc, freed memory kept")


def return_freed_memory() -> str:
    """Tune glibc's malloc to give freed memory back, so RSS follows the live tensors (see the module docstring).

    Returns "glibc, freed memory returned", or what ``keep_freed_memory`` returns when it leaves malloc alone.
    """
    return _set_glibc(RETURN_ABOVE, RETURN_TRIM, DEFAULT_MMAP_MAX, "glibc, freed memory returned")


def _set_glibc(mmap_threshold: int, trim_threshold: int, mmap_max: int, name: str) -> str:
    if (preloaded := preloaded_allocator()) is not None:
        return preloaded
    if os.environ.get(OPT_OUT, "").lower() == "system" or not sys.platform.startswith("linux"):
        return "glibc defaults"
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname (find_library would run ldconfig in a subprocess)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return "glibc defaults"
    # mallopt returns 1 on success; the mmap threshold first: setting either turns off glibc's dynamic adjustment
    if any(mallopt(option, value) != 1 for option, value in
           ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_MMAP_MAX, mmap_max))):
        return "glibc defaults"
    return name
