"""Vandermonde products of a diagonal SSM: its convolution kernel and its state, without (H, N/2, L) tables.

Public ops: ``vandermonde(w, dtA, length)`` (K = 2 Re(w V), the SSM kernel when w = C dB) and
``vandermonde_transpose(g, dtA)`` (S = V g, the state after reading g backwards). Both run the chunked
matmuls of ``chunked.py`` on every device (CPU and CUDA: matmuls suit both, no Triton kernel needed);
``reference.py`` keeps the materialised definitions. The math is in this folder's README.md.
"""

from __future__ import annotations

import torch

from hybrid_pretrain.kernels.vandermonde.chunked import Vandermonde, VandermondeTranspose, chunking
from hybrid_pretrain.kernels.vandermonde.reference import powers, vandermonde_ref, vandermonde_transpose_ref

__all__ = ["chunking", "powers", "vandermonde", "vandermonde_ref", "vandermonde_transpose", "vandermonde_transpose_ref"]


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
    return Vandermonde.apply(w, dtA, length)


def vandermonde_transpose(g: torch.Tensor, dtA: torch.Tensor) -> torch.Tensor:
    """``S[..., h, n] = sum_l g[..., h, l] exp(dtA[h, n] l)``.

    Args:
        g: (..., H, L) real sequences (an SSM's input read backwards gives its final state).
        dtA: (H, N/2) complex.

    Returns:
        S: (..., H, N/2) complex64 (complex128 when dtA is). Differentiable in g and dtA.
    """
    if dtA.dim() != 2 or g.dim() < 2 or g.shape[-2] != dtA.shape[0]:
        raise ValueError(
            f"vandermonde_transpose expects g (..., H, L) and dtA (H, N/2), got {tuple(g.shape)}, {tuple(dtA.shape)}"
        )
    return VandermondeTranspose.apply(g, dtA)
