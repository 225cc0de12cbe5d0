"""The mixer shell shared by convolutional SSM layers (S4, DSS): ``out_proj(GELU(k * u + D u))`` per channel.

Subclasses give the kernel (``self.ssm.kernel(L)``) and their own recurrent ``allocate_state``/``step``;
the convolution, skip term, bidirectional split and output projection live here once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.models.roles import row_linear
from hybrid_pretrain.models.ssm.bidirectional import ssm_convolve


class ConvSSMMixer(nn.Module):
    """``forward(x (B, L, D)) -> (B, L, D)``; `ssm` holds 1 (causal) or 2 (bidirectional) kernels a channel."""

    def __init__(self, d_model: int, layer_idx: int, ssm: nn.Module, bidirectional: bool) -> None:
        super().__init__()
        self.layer_idx, self.d_model, self.bidirectional = layer_idx, d_model, bidirectional
        self.ssm = ssm
        self.D = nn.Parameter(torch.empty(d_model))
        self.out_proj = row_linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        L = x.shape[1]
        k = self.ssm.kernel(L)  # (D, L) or (2 D, L)
        if self.bidirectional:
            k = k.view(2, self.d_model, L)  # (2, D, L): forward, backward
        y = ssm_convolve(x.transpose(1, 2), k, self.D, self.bidirectional).transpose(1, 2)  # (B, L, D)
        return self.out_proj(F.gelu(y, approximate="tanh"))
