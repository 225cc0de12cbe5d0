"""How the Triton kernels are built: compiled on CUDA machines, interpreted everywhere else.

Triton decides between compiling and interpreting when a function is *decorated*: ``TRITON_INTERPRET``
is read when ``@triton.jit`` runs, for our kernels and for Triton's own library functions
(``tl.sum``, ``tl.max``, ``tl.zeros`` are themselves jit functions). Setting the variable in a test
conftest is too late when another package imported Triton first (megatron-core does), so without
CUDA this module sets it before importing Triton and, if Triton was already imported, re-wraps the
library's jit functions for the interpreter. Either way the same kernel source runs on CPU tensors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    # No device can run a compiled Triton kernel here; the interpreter is the only way to run one.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _interpret_triton_language() -> None:
    """Re-wrap ``triton.language``'s jit functions (decorated before TRITON_INTERPRET was set) for the interpreter."""

    for name, module in list(sys.modules.items()):
        if name == "triton.language" or name.startswith("triton.language."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    setattr(module, attr, InterpretedFunction(value.fn))


if INTERPRETED:
    _interpret_triton_language()


def jit(fn: Callable) -> Callable:
    """``triton.jit`` with CUDA, Triton's interpreter (``TRITON_INTERPRET=1`` semantics) without it."""
    if not INTERPRETED:
        return triton.jit(fn)

    return InterpretedFunction(fn)
