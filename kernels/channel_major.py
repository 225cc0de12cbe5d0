"""Channel-major activations for convolution mixers: projections in and out of (D, B, L) storage, fast on CPU.

Projections produce length-major (B, L, D) activations; an SSM convolution runs along L over channel-major
rows. Mixing the two layouts in one op is what costs on CPU: an elementwise product of a (B, D, L) view of a
(B, L, D) tensor with a channel-major one walks one operand with a stride of D floats, and a 3-D
``.transpose(1, 2).contiguous()`` is not cache-blocked (measured on the 2-core VM, fp32, (1, 1024, 1024):
7.7 ms vs 1.3 ms for the product, 8.1 ms vs 1.2 ms for the copy). So a mixer converts once on the way in
and once on the way out, and every op in between reads matching layouts:

- ``linear_to_channel_major``: ``x W^T + b`` for several projections of one x, computed transposed, ``W x^T``,
  each into its rows of one (sum D_i, B L) result that is already channel-major: no copy at all.
- ``linear_from_channel_major``: the output projection read straight from channel-major y (BLAS takes the
  transposed operand for free), giving (B, L, D_out).
- ``swap_last_two``: the fallback for projections this module cannot compute itself (tensor-parallel layers):
  a (B, R, C) -> (B, C, R) copy, one cache-blocked 2-D copy per sequence.

Both linear Functions write their backward so every gradient comes out in the layout its input had
(autograd through ``mm`` of a transposed operand would hand back transposed, i.e. strided, gradients).
Under autocast they compute in the autocast dtype, as ``F.linear`` does.
"""

from __future__ import annotations

import torch


def _autocast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Cast floating tensors to the autocast dtype when autocast is on for their device (F.linear's behaviour)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device)
    return [None if t is None else t.to(dtype) for t in tensors]


class _ToChannelMajor(torch.autograd.Function):
    """x (N, D_in), then (W_i (D_i, D_in), b_i (D_i,) or None) pairs -> rows W_i x^T + b_i stacked: (sum D_i, N).

    Each projection writes its own rows of one contiguous output (no stacked copy of the weights, which
    backward would have to keep alive: 48 MiB per H3 layer at d_model 2048), and only x and the weights
    themselves are saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, *params: torch.Tensor | None) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        sizes = [w.shape[0] for w in weights]
        yt = x.new_empty(sum(sizes), x.shape[0])
        for w, b, rows in zip(weights, biases, yt.split(sizes)):
            if b is None:
                torch.mm(w, x.t(), out=rows)
            else:
                torch.addmm(b.unsqueeze(1), w, x.t(), out=rows)
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = [b is not None for b in biases]
        return yt

    @staticmethod
    def backward(ctx, dyt: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, grads = None, []
        for i, (w, g) in enumerate(zip(weights, dyt.split([w.shape[0] for w in weights]))):
            if need[0]:  # (N, D_in), contiguous like x: sum over the projections of dy_i^T W_i
                dx = torch.mm(g.t(), w) if dx is None else dx.addmm_(g.t(), w)
            grads.append(torch.mm(g, x) if need[1 + 2 * i] else None)
            grads.append(g.sum(1) if ctx.has_bias[i] and need[2 + 2 * i] else None)
        return dx, *grads


class _FromChannelMajor(torch.autograd.Function):
    """y^T (D_in, N), W (D_out, D_in), b or None -> y W^T + b, contiguous (N, D_out)."""

    @staticmethod
    def forward(ctx, yt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(yt, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.mm(yt.t(), weight.t())
        return torch.addmm(bias, yt.t(), weight.t())

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        yt, weight = ctx.saved_tensors
        dyt = torch.mm(weight.t(), dout.t()) if ctx.needs_input_grad[0] else None  # (D_in, N), contiguous like y^T
        dw = torch.mm(dout.t(), yt.t()) if ctx.needs_input_grad[1] else None
        db = dout.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dyt, dw, db


def linear_to_channel_major(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """``[F.linear(x, w, b).transpose(1, 2) for w, b in zip(weights, biases)]``, computed channel-major.

    x: (B, L, D_in). Returns one (B, D_i, L) tensor per weight (D_i, D_in), each a view of contiguous
    (D_i, B, L) storage: for one sequence plain contiguous, for a batch contiguous along L.
    """
    B, L, d_in = x.shape
    cast = _autocast(x, *[t for pair in zip(weights, biases) for t in pair])
    yt = _ToChannelMajor.apply(cast[0].reshape(B * L, d_in), *cast[1:])  # (sum D_i, B L)
    return [t.view(-1, B, L).transpose(0, 1) for t in yt.split([w.shape[0] for w in weights])]  # (B, D_i, L)


def linear_from_channel_major(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(y.transpose(1, 2), weight, bias)`` for y (B, D_in, L): (B, L, D_out), contiguous.

    Free of copies when y is a view of (D_in, B, L) storage (what ``linear_to_channel_major`` and the
    ops between read); otherwise one copy with contiguous rows of L.
    """
    B, d_in, L = y.shape
    yt = y.transpose(0, 1).reshape(d_in, B * L)  # (D_in, B L)
    yt, weight, bias = _autocast(yt, weight, bias)
    return _FromChannelMajor.apply(yt, weight, bias).view(B, L, -1)


def _swapped(x: torch.Tensor) -> torch.Tensor:
    """x (B, R, C) -> contiguous (B, C, R)."""
    if x.is_cuda:
        return x.transpose(1, 2).contiguous()
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for b in range(x.shape[0]):  # one 2-D copy per sequence: blocked when x[b] is contiguous (a 3-D copy never is)
        out[b].copy_(x[b].t())
    return out


class _SwapLastTwo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _swapped(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _swapped(grad)


def swap_last_two(x: torch.Tensor) -> torch.Tensor:
    """x (B, R, C) -> the contiguous (B, C, R) copy of ``x.transpose(1, 2)``; differentiable."""
    if x.dim() != 3:
        raise ValueError(f"swap_last_two expects a (B, R, C) tensor, got shape {tuple(x.shape)}")
    return _SwapLastTwo.apply(x)
