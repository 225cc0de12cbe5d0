"""S4D layer (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space Models").

    y = W_o GELU(DiagonalSSM(x))     one diagonal SSM per channel, then a position-wise output mix

The H3 paper's baseline for the synthetic recall tasks: H3 without the shift SSM and without the
multiplicative q/k/v interactions. It keeps a decaying summary of the past but cannot look up a
token it saw next to a key: with two layers and an MLP between them it still learns induction head
(one marked token to carry forward), not associative recall over many key-value pairs (bench/RESULTS.md).

The kernel is the ZOH Vandermonde product ``K_l = 2 Re(sum_n C_n dB_n exp(dt A_n l))`` (``kernels.fftconv``).
Options (``model.options.s4d``): d_state (0: model.h3_d_state), init ``lin`` (S4D-Lin, A_n = -1/2 + i pi n)
or ``legs`` (S4D-LegS: the diagonal of HiPPO-LegS's DPLR form, its B folded into C), dt_min/dt_max, and
bidirectional (a second, anti-causal SSM as in S4's bidirectional mode: not causal, no step()).
The defaults are the layer as it was before these options existed (same parameters, same init).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.ssm import DT_MAX, DT_MIN, DiagonalSSM
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.roles import row_linear
from hybrid_pretrain.models.ssm.bidirectional import refuse_step, ssm_convolve
from hybrid_pretrain.models.ssm.hippo import s4d_legs

INITS = ("lin", "legs")


@dataclass
class S4DOptions:
    d_state: int = 0  # real state size N (N/2 complex modes); 0: model.h3_d_state
    init: str = "lin"  # "lin" (S4D-Lin) or "legs" (S4D-LegS)
    dt_min: float = DT_MIN
    dt_max: float = DT_MAX
    bidirectional: bool = False

    def validate(self, name: str) -> None:
        if self.init not in INITS:
            raise ConfigError(f"model.options.{name}.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.d_state and (self.d_state < 2 or self.d_state % 2):
            raise ConfigError(f"model.options.{name}.d_state must be an even integer >= 2, got {self.d_state}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"model.options.{name}: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


class InitDiagonalSSM(DiagonalSSM):
    """DiagonalSSM with a choice of init (S4D-Lin or S4D-LegS) and dt range; same parameters and kernel.

    A subclass rather than an init call in S4D, because LanguageModel.reset_parameters re-runs every
    submodule's own reset_parameters after its parent's.
    """

    init, dt_min, dt_max = "lin", DT_MIN, DT_MAX  # class defaults: DiagonalSSM.__init__ resets before we set ours

    def __init__(self, channels: int, d_state: int, init: str = "lin", dt_min: float = DT_MIN,
                 dt_max: float = DT_MAX) -> None:
        super().__init__(channels, d_state)
        if (init, dt_min, dt_max) != (self.init, self.dt_min, self.dt_max):
            self.init, self.dt_min, self.dt_max = init, dt_min, dt_max
            self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # S4D-Lin; the defaults stop here, so today's init is unchanged
        with torch.no_grad():
            if (self.dt_min, self.dt_max) != (DT_MIN, DT_MAX):
                nn.init.uniform_(self.log_dt, math.log(self.dt_min), math.log(self.dt_max))
            if self.init == "legs":
                lam, B = s4d_legs(self.n_modes)  # complex128 (N/2,)
                self.log_A_real.copy_(torch.log(-lam.real).to(self.log_A_real.dtype).expand_as(self.log_A_real))
                self.A_imag.copy_(lam.imag.to(self.A_imag.dtype).expand_as(self.A_imag))
                B = B.to(self.C.device)
                C = torch.view_as_complex(self.C.detach().to(torch.float64).contiguous()) * B  # B folded into C
                self.C.copy_(torch.view_as_real(C).to(self.C.dtype))


class S4D(nn.Module):
    """S4D mixer: ``forward(x (B, L, D)) -> (B, L, D)``; recurrent ``allocate_state``/``step``/``prefill``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        opts = layer_options(cfg, "s4d", S4DOptions)
        self.layer_idx = layer_idx
        self.d_model = cfg.d_model
        self.bidirectional = opts.bidirectional
        args = (cfg.d_model, opts.d_state or cfg.h3_d_state, opts.init, opts.dt_min, opts.dt_max)
        self.ssm = InitDiagonalSSM(*args)
        # Bidirectional: a second SSM read over the reversed sequence; both skip terms add up.
        self.ssm_backward = InitDiagonalSSM(*args) if opts.bidirectional else None
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        u = x.transpose(1, 2)  # (B, D, L)
        if self.ssm_backward is None:
            y = self.ssm(u)  # (B, D, L)
        else:
            L = u.shape[-1]
            k = torch.stack([self.ssm.kernel(L), self.ssm_backward.kernel(L)])  # (2, D, L)
            y = ssm_convolve(u, k, self.ssm.D + self.ssm_backward.D, True)  # (B, D, L)
        return self.out_proj(F.gelu(y.transpose(1, 2), approximate="tanh"))

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """Complex SSM state (B, D, N/2), constant in sequence length (`max_len` keeps the interface uniform)."""
        if self.bidirectional:
            raise refuse_step("s4d")
        return {"ssm": self.ssm.allocate_state((batch_size,), device=device or self.out_proj.weight.device)}

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D); replaces `state["ssm"]` with the next state."""
        if self.bidirectional:
            raise refuse_step("s4d")
        y, state["ssm"] = self.ssm.step(x_t, state["ssm"])  # (B, D)
        return self.out_proj(F.gelu(y, approximate="tanh"))

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), leaving `state` as if `step` had read the L positions (from a zero state)."""
        if self.bidirectional:
            raise refuse_step("s4d")
        state["ssm"] = self.ssm.state_after(x.transpose(1, 2))  # (B, D, N/2)
        return self.forward(x)
