"""Parallel prefix scan of a linear recurrence in pure PyTorch (odd/even recursive doubling, Blelloch-style).

torch has no public eager associative scan (``torch._higher_order_ops.associative_scan`` is private and
compile-oriented), so this is written out: each level combines neighbouring pairs, recurses on the half
as long sequence, then fills in the even positions. Work is O(L) and the depth 2 log2(L), each level one
vectorised op over the whole batch, so autograd differentiates it as it is.
"""

from __future__ import annotations

import torch


def _combine_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan along dim 0: a, b (L, ...) of the same shape -> x (L, ...)."""
    L = b.shape[0]
    if L == 1:
        return b
    if L % 2:  # pad with the identity element (a=1, b=0) so positions pair up
        a = torch.cat([a, torch.ones_like(a[:1])])
        b = torch.cat([b, torch.zeros_like(b[:1])])
    a_even, a_odd = a[0::2], a[1::2]  # (L/2, ...) each
    b_even, b_odd = b[0::2], b[1::2]
    # Pair (2i, 2i+1) composed: one step of the half-length recurrence.
    x_odd = _combine_scan(a_odd * a_even, a_odd * b_even + b_odd)  # states at positions 1, 3, 5, ...
    # Even positions 2i (i >= 1) take one step from the odd state before them.
    x_even = torch.cat([b_even[:1], a_even[1:] * x_odd[:-1] + b_even[1:]])  # (L/2, ...)
    return torch.stack([x_even, x_odd], dim=1).flatten(0, 1)[:L]  # interleave back: (L, ...)


def linear_scan(
    a: torch.Tensor, b: torch.Tensor, dim: int = 1, x0: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """Every state of ``x_k = a_k * x_{k-1} + b_k`` in O(log L) sequential steps.

    Args:
        a: decays, broadcastable to b (real or complex; size 1 along `dim` for a time-invariant decay).
        b: inputs (..., L, ...), real or complex.
        dim: the sequence dimension.
        x0: initial state (b's shape without `dim`) or None for zeros; folded into b[0] as a[0] x0.
        reverse: run from the last position to the first (x_k = a_k x_{k+1} + b_k), for bidirectional layers.

    Returns:
        x: b's shape and dtype (the promoted dtype of a and b). Differentiable in a, b and x0.
    """
    a, b = torch.broadcast_tensors(a, b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.movedim(dim, 0).to(dtype), b.movedim(dim, 0).to(dtype)  # (L, ...)
    if reverse:
        a, b = a.flip(0), b.flip(0)
    if x0 is not None:
        b = torch.cat([b[:1] + a[:1] * x0.to(dtype), b[1:]])
    x = _combine_scan(a, b)
    if reverse:
        x = x.flip(0)
    return x.movedim(0, dim)
