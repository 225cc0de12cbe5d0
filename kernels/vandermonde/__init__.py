"""Vandermonde products of a diagonal SSM: its convolution kernel and its state, without (H, N/2, L) tables.

Public ops: ``vandermonde(w, dtA, length)`` (K = 2 Re(w V), the SSM kernel when w = C dB) and
``vandermonde_transpose(g, dtA)`` (S = V g, the state after reading g backwards). Both run the chunked
matmuls of ``chunked.py`` on every device (CPU and CUDA: matmuls suit both, no Triton kernel needed),
except that a kernel of at most ``DIRECT_UP_TO`` (h, n, l) terms is one small table (``vandermonde_direct``);
``reference.py`` keeps the materialised definitions. The math is in this folder's README.md.
"""

from __future__ import annotations

import torch

from hybrid_pretrain.kernels.vandermonde.chunked import (
    Vandermonde,
    VandermondeTranspose,
    chunking,
    transpose_tables,
    vandermonde_transpose_chunked,
)
from hybrid_pretrain.kernels.vandermonde.reference import powers, vandermonde_ref, vandermonde_transpose_ref

__all__ = [
    "chunking", "powers", "transpose_tables", "vandermonde", "vandermonde_direct", "vandermonde_ref",
    "vandermonde_transpose", "vandermonde_transpose_ref", "DIRECT_UP_TO",
]

# Below this many (h, n, l) terms the whole table is smaller than the chunked path's fixed cost (~100 small
# ops in forward and backward; the H3 synthetic tasks' kernel, (4, 32, 40), ran 2x faster direct).
DIRECT_UP_TO = 1 << 16


def vandermonde_direct(w: torch.Tensor, dtA: torch.Tensor, length: int) -> torch.Tensor:
    """``vandermonde`` by one (H, N/2, L) table in real arithmetic, autograd through a few ops: for small tables.

    Autocast is off as in the chunked path: under bf16 autocast the einsums would drop the kernel to bf16.
    """
    with torch.autocast(dtA.device.type, enabled=False):
        return _vandermonde_table(w, dtA, length)


def _vandermonde_table(w: torch.Tensor, dtA: torch.Tensor, length: int) -> torch.Tensor:
    steps = torch.arange(length, device=dtA.device, dtype=dtA.real.dtype)
    decay = torch.exp(dtA.real.unsqueeze(-1) * steps)  # (H, N/2, L)
    angle = dtA.imag.unsqueeze(-1) * steps
    return 2 * (torch.einsum("...hn,hnl->...hl", w.real, decay * torch.cos(angle))
                - torch.einsum("...hn,hnl->...hl", w.imag, decay * torch.sin(angle)))


def vandermonde(w: torch.Tensor, dtA: torch.Tensor, length: int) -> torch.Tensor:
    """``K[..., h, l] = 2 Re(sum_n w[..., h, n] exp(dtA[h, n] l))`` for l = 0 .. length-1.

    Args:
        w: (..., H, N/2) complex weights of the N/2 conjugate-pair modes (C dB for an SSM kernel).
        dtA: (H, N/2) complex, the log of each mode's decay per step (dt A).
        length: L.

    Returns:
        K: (..., H, L) real, fp32 (fp64 when dtA is complex128). Differentiable in w and dtA.
    """
    if dtA.dim() != 2 or w.shape[-2:] != dtA.shape:
        raise ValueError(
            f"vandermonde expects w (..., H, N/2) and dtA (H, N/2), got {tuple(w.shape)}, {tuple(dtA.shape)}"
        )
    if dtA.numel() * length <= DIRECT_UP_TO:
        return vandermonde_direct(w, dtA, length)
    return Vandermonde.apply(w, dtA, length)


def vandermonde_transpose(g: torch.Tensor, dtA: torch.Tensor,
                          tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``S[..., h, n] = sum_l g[..., h, l] exp(dtA[h, n] l)``.

    Args:
        g: (..., H, L) real sequences (an SSM's input read backwards gives its final state).
        dtA: (H, N/2) complex.
        tables: ``transpose_tables(dtA, L, g[..., 0, 0].numel())`` kept by the caller, or None to build them;
            only without autograd (their gradient path is not kept).

    Returns:
        S: (..., H, N/2) complex64 (complex128 when dtA is). Differentiable in g and dtA.
    """
    if dtA.dim() != 2 or g.dim() < 2 or g.shape[-2] != dtA.shape[0]:
        raise ValueError(
            f"vandermonde_transpose expects g (..., H, L) and dtA (H, N/2), got {tuple(g.shape)}, {tuple(dtA.shape)}"
        )
    if tables is not None:
        if torch.is_grad_enabled() and (g.requires_grad or dtA.requires_grad):
            raise ValueError("vandermonde_transpose: kept tables are for inference (no autograd through them)")
        return vandermonde_transpose_chunked(g, dtA, tables=tables)[0]
    return VandermondeTranspose.apply(g, dtA)
