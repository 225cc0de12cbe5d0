"""S4D layer (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space Models").

    y = W_o GELU(DiagonalSSM(x))     one diagonal SSM per channel, then a position-wise output mix

The H3 paper's baseline for the synthetic recall tasks: H3 without the shift SSM and without the
multiplicative q/k/v interactions. It keeps a decaying summary of the past but cannot look up a
token it saw next to a key, which is why it fails associative recall and induction heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.mixers.ssm import DiagonalSSM
from parallel.linear import row_linear


def diagonal_ssm_state(ssm: DiagonalSSM, u: torch.Tensor) -> torch.Tensor:
    """The recurrent state `ssm.step` reaches after reading all of u: (..., H, L) -> complex (..., H, N/2).

    x_{L-1} = sum_s dA^(L-1-s) dB u_s, evaluated in one contraction instead of L sequential steps, so a
    prompt can be prefilled with one forward pass.
    """
    dtA, dB, _ = ssm.discretize()  # each (H, N/2)
    L = u.shape[-1]
    ages = torch.arange(L - 1, -1, -1, device=dtA.device, dtype=dtA.real.dtype)  # (L,) steps since input s
    # exp(dtA * age) through real exp/cos/sin: torch's complex exp is ~2x slower on CPU.
    angle = dtA.imag.unsqueeze(-1) * ages  # (H, N/2, L)
    decay = torch.exp(dtA.real.unsqueeze(-1) * ages) * torch.complex(torch.cos(angle), torch.sin(angle))
    return dB * torch.einsum("...hl,hnl->...hn", u.to(decay.dtype), decay)


class S4D(nn.Module):
    """S4D mixer: ``forward(x (B, L, D)) -> (B, L, D)``; recurrent ``allocate_state``/``step``/``prefill``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = cfg.d_model
        self.ssm = DiagonalSSM(cfg.d_model, cfg.h3_d_state)
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        y = self.ssm(x.transpose(1, 2)).transpose(1, 2)  # (B, L, D)
        return self.out_proj(F.gelu(y, approximate="tanh"))

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """Complex SSM state (B, D, N/2), constant in sequence length (`max_len` keeps the interface uniform)."""
        return {"ssm": self.ssm.allocate_state((batch_size,), device=device or self.out_proj.weight.device)}

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D); replaces `state["ssm"]` with the next state."""
        y, state["ssm"] = self.ssm.step(x_t, state["ssm"])  # (B, D)
        return self.out_proj(F.gelu(y, approximate="tanh"))

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), leaving `state` as if `step` had read the L positions (from a zero state)."""
        state["ssm"] = diagonal_ssm_state(self.ssm, x.transpose(1, 2))  # (B, D, N/2)
        return self.forward(x)
