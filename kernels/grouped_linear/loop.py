"""Grouped linear layer as one fused ``addmm`` per group, writing into one output: the CPU path.

The same per-group matmuls as the reference, in an autograd function so that the groups write their rows
straight into the (N, M) output and, in the backward, into the (N, K) input gradient: the reference's
``cat`` and the ``cat`` autograd makes to undo its ``split`` each copy the whole activation once more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[:len(sizes)], params[len(sizes):]
        ctx.sizes = sizes
        ctx.save_for_backward(x, *weights)
        y = x.new_empty(x.shape[0], weights[0].shape[0])  # (N, M)
        for w, b, rows_in, rows_out in zip(weights, biases, x.split(sizes), y.split(sizes)):
            torch.addmm(b, rows_in, w.t(), out=rows_out)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        sizes = ctx.sizes
        dy = dy.contiguous()
        dx = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None  # (N, K)
        dx_rows = dx.split(sizes) if dx is not None else [None] * len(sizes)
        dws, dbs = [], []
        for w, rows_in, grad_out, grad_in in zip(weights, x.split(sizes), dy.split(sizes), dx_rows):
            if grad_in is not None:
                torch.mm(grad_out, w, out=grad_in)
            dws.append(grad_out.t() @ rows_in)  # (M, K); zeros for an empty group
            dbs.append(grad_out.sum(dim=0))  # (M,)
        return dx, None, *dws, *dbs


def grouped_linear_loop(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                        sizes: Sequence[int]) -> torch.Tensor:
    """Same contract as ``grouped_linear_ref``."""
    return _GroupedLinear.apply(x.contiguous(), tuple(sizes), *weights, *biases)
