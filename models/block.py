"""One residual layer, agnostic of which mixer and feed-forward it holds (pre-norm, as GPT-2)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """``x + mixer(norm1(x))`` then ``+ ffn(norm2(x))``, each branch followed by dropout.

    Pre-norm keeps the residual stream an untouched sum of branch outputs, which is what makes deep
    stacks train stably and lets the model scale residual projections by 1/sqrt(2 * n_layers).
    """

    def __init__(
        self, mixer: nn.Module, ffn: nn.Module, norm1: nn.Module, norm2: nn.Module, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1, self.mixer = norm1, mixer
        self.norm2, self.ffn = norm2, ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.drop(self.mixer(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """The mixer's recurrent state (the feed-forward is position-wise and keeps none)."""
        return self.mixer.allocate_state(batch_size, max_len, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D), one position of ``forward``; updates `state` in place."""
        x_t = x_t + self.drop(self.mixer.step(self.norm1(x_t), state))
        return x_t + self.drop(self.ffn(self.norm2(x_t)))
