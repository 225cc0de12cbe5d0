"""Decoding steps on CPU through MKL's packed GEMM: each weight re-laid out once per generation, not per call.

A decoding step multiplies B rows (one per sequence) by every weight matrix of the model. MKL's sgemm copies
the weight operand into its blocked layout on every call, and with a few rows that copy costs more than the
product: measured on the 2-core VM, one thread, B = 8, F.linear 37.4 ms against 17.4 ms with the weight packed
once for the 50257 x 768 output head, 1.04 vs 0.40 ms for 3072 x 768, 0.16 vs 0.09 ms for 768 x 768 (at B = 1:
no gain). torch exposes MKL's pack-once API as ``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``,
which inductor's CPU weight prepacking uses when it freezes a model; this applies it to the eager decoding
loop without compiling anything. Results differ from F.linear by summation order only (~1e-4 on the head's
logits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psutil
import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 2  # at one row MKL's GEMV path reads the weight once already


def packing_helps(model: nn.Module, rows: int) -> bool:
    """Whether `model`'s decoding steps of `rows` rows run packed: CPU fp32 weights, torch built with MKL, at least
    MIN_ROWS rows, and the packed copies (about the linear weights' size again) within half the free memory."""
    if rows < MIN_ROWS or not torch.backends.mkl.is_available() or not hasattr(torch.ops.mkl, "_mkl_linear"):
        return False
    linears, head = _packable(model)
    weights = [m.weight for m in linears] + ([head] if head is not None else [])
    if not weights or any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return False
    return 2 * sum(w.numel() * w.element_size() for w in weights) < psutil.virtual_memory().available


def _packable(model: nn.Module) -> tuple[list[nn.Linear], torch.Tensor | None]:
    """The layers `PackedLinears` packs: plain ``nn.Linear`` modules (subclasses such as tensor-parallel layers may
    override forward, so they keep it), and the tied output head's weight when the model has one."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    # a LanguageModel with tied embeddings computes logits with its embedding matrix when lm_head is None
    tied = getattr(model, "lm_head", 0) is None and isinstance(getattr(model, "embedding", None), nn.Embedding)
    return linears, model.embedding.weight if tied else None


class _PackedHead(nn.Module):
    """The tied output head (logits against the embedding matrix) as a packed linear layer without bias."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor, rows: int) -> None:
        super().__init__()
        self.weight, self.packed, self.rows = weight, packed, rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _linear(h, self.weight, None, self.packed, self.rows)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor,
            rows: int) -> torch.Tensor:
    """F.linear(x, weight, bias) through the packed weight when x has the packed row count and no autograd runs."""
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() != rows * x.shape[-1]:
        return F.linear(x, weight, bias)
    out = torch.ops.mkl._mkl_linear(x.reshape(rows, -1), packed, weight, bias, rows)  # (rows, D_out)
    return out.view(*x.shape[:-1], -1)


class PackedLinears:
    """Every ``nn.Linear`` of `model` (and its tied output head) packed for inputs of `rows` rows.

    ``active()`` routes their forwards through the packed weights; other inputs (a prefill's B x L rows, a group
    of another size, anything under autograd) still take F.linear. Pack after the last weight update: the
    copies do not follow later changes (a generation packs at its start).
    """

    def __init__(self, model: nn.Module, rows: int) -> None:
        self.model, self.rows = model, rows
        pack = torch.ops.mkl._mkl_reorder_linear_weight
        with torch.no_grad():
            linears, head = _packable(model)
            self.linears = {m: pack(m.weight, rows) for m in linears}
            self.head = _PackedHead(head, pack(head, rows), rows) if head is not None else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Patch for one decoding step. Scoped per step (~100 attribute sets, microseconds against a step of
        milliseconds) so no exit path of a caller (transformers' generate loop included) can leave a model patched."""
        for m, packed in self.linears.items():
            m.forward = lambda x, m=m, packed=packed: _linear(x, m.weight, m.bias, packed, self.rows)
        if self.head is not None:
            self.model.lm_head = self.head  # the head path of LanguageModel._logits, for the duration
        try:
            yield
        finally:
            for m in self.linears:
                del m.forward  # back to nn.Linear.forward
            if self.head is not None:
                self.model.lm_head = None
