"""GSS layer (Mehta, Gupta, Cutkosky, Neyshabur 2022, "Long Range Language Modeling via Gated State Spaces").

    v  = GELU(W_v x)        (B, L, F)   gate, F = expand * D
    u  = GELU(W_u x)        (B, L, H)   reduced width, H = ssm_dim (default D / 4)
    y  = DSS(u)             (B, L, H)   DSS-softmax SSM per reduced channel (models.mixers.dss.DSSKernel)
    uc = W_up y             (B, L, F)   back to the gate's width
    out = W_o (uc * v)      (B, L, D)

The SSM runs on the reduced width, which is what makes GSS cheaper than DSS at the same model width; the
multiplicative gate restores the expressivity the smaller SSM gives up. Causal, with a recurrent step().

Options (``model.options.gss``): d_state (0: model.h3_d_state), expand, ssm_dim (0: d_model // 4),
dt_min/dt_max, kernel_len (0: model.max_seq_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.dss import DSSKernel
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.roles import column_linear, replicated_linear, row_linear
from hybrid_pretrain.models.ssm.bidirectional import ssm_convolve


@dataclass
class GSSOptions:
    d_state: int = 0  # N (N/2 complex modes); 0: model.h3_d_state
    expand: int = 4  # F = expand * d_model, the gate width (the paper's F = 4 E)
    ssm_dim: int = 0  # reduced SSM width H; 0: d_model // 4 (the paper's H = E / 4)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    kernel_len: int = 0  # DSS softmax normalisation length = longest input; 0: model.max_seq_len

    def validate(self, name: str) -> None:
        if self.d_state and (self.d_state < 2 or self.d_state % 2):
            raise ConfigError(f"model.options.{name}.d_state must be an even integer >= 2, got {self.d_state}")
        if self.expand < 1 or self.ssm_dim < 0 or self.kernel_len < 0:
            raise ConfigError(f"model.options.{name}: need expand >= 1, ssm_dim >= 0 and kernel_len >= 0")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"model.options.{name}: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


class GSS(nn.Module):
    """GSS mixer: ``forward(x (B, L, D)) -> (B, L, D)``; recurrent ``allocate_state``/``step``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        opts = layer_options(cfg, "gss", GSSOptions)
        self.layer_idx, self.d_model = layer_idx, cfg.d_model
        width, reduced = opts.expand * cfg.d_model, opts.ssm_dim or max(1, cfg.d_model // 4)
        self.v_proj = column_linear(cfg.d_model, width)
        # The reduced SSM path is small: every tensor-parallel rank keeps it whole, W_up then splits F.
        self.u_proj = replicated_linear(cfg.d_model, reduced)
        self.ssm = DSSKernel(reduced, opts.d_state or cfg.h3_d_state, opts.kernel_len or cfg.max_seq_len,
                             opts.dt_min, opts.dt_max)
        self.D = nn.Parameter(torch.empty(reduced))
        self.up_proj = column_linear(reduced, width)
        self.out_proj = row_linear(width, cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        L = x.shape[1]
        v = F.gelu(self.v_proj(x), approximate="tanh")  # (B, L, F)
        u = F.gelu(self.u_proj(x), approximate="tanh")  # (B, L, H)
        y = ssm_convolve(u.transpose(1, 2), self.ssm.kernel(L), self.D, False).transpose(1, 2)  # (B, L, H)
        return self.out_proj(self.up_proj(y) * v)

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """Complex DSS state (B, H, N/2) and position; stepping past kernel_len is refused."""
        return self.ssm.allocate_state(batch_size, device)

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D); replaces the entries of `state`."""
        v = F.gelu(self.v_proj(x_t), approximate="tanh")  # (B, F)
        u = F.gelu(self.u_proj(x_t), approximate="tanh")  # (B, H)
        y = self.ssm.step(u, state) + self.D * u  # (B, H)
        return self.out_proj(self.up_proj(y) * v)
