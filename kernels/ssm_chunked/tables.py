"""exp(dtA k) for k = 0 .. count-1 with a gradient in dtA: the power table of ``kernels.vandermonde``.

``power_table`` builds the table from two sqrt(count) factors (exp, cos and sin on few numbers, one complex
multiply); autograd through ``torch.exp`` of a complex (H, count, N/2) tensor instead ran ~10x slower on
the development CPU (PyTorch's complex exp is not vectorised there). The table is holomorphic in dtA, with
derivative k exp(dtA k), so the backward is one product and a sum over k.
"""

from __future__ import annotations

import torch

from hybrid_pretrain.kernels.vandermonde.chunked import power_table


class PowerTable(torch.autograd.Function):
    """dtA (H, N/2) complex -> E (H, count, N/2), E[:, k] = exp(dtA k)."""

    @staticmethod
    def forward(ctx, dtA: torch.Tensor, count: int) -> torch.Tensor:
        E = power_table(dtA, count, 1, dtA.real.dtype)
        ctx.save_for_backward(E)
        return E

    @staticmethod
    def backward(ctx, dE: torch.Tensor) -> tuple[torch.Tensor, None]:
        (E,) = ctx.saved_tensors
        k = torch.arange(E.shape[1], device=E.device, dtype=E.real.dtype).unsqueeze(-1)  # (count, 1)
        return (dE * E.conj()).mul_(k).sum(1), None
