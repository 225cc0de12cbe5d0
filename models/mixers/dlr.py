"""DLR layer (Gupta, Mehta & Berant 2023, "Simplifying and Understanding State Space Models with Diagonal
Linear RNNs").

    x_k = Lambda x_k-1 + u_k,   y_k = 2 Re(C x_k) + D u_k,   out = W_o GELU(y)     (per channel)

A diagonal linear RNN with N/2 complex modes per channel (conjugate pairs, hence 2 Re) whose Lambda is the
parameter itself: there is no continuous-time A and no step size to discretise, the paper's point being that
the discretisation of S4/DSS adds nothing a directly parameterised Lambda cannot learn. B is folded into C
(only their product enters the output). Lambda = exp(-exp(nu) + i theta) keeps |Lambda| < 1.

Two drop-in paths compute the same output (``model.options.dlr.mode``):
- ``fft`` (default, the paper's): the Vandermonde kernel K[l] = 2 Re(C Lambda^l) and one FFT convolution
  (``kernels.fftconv.ssm_conv``): O(H L log L) and no (B, L, H, N/2) state tensor, so it is the cheaper one;
- ``scan``: the recurrence itself by the parallel associative scan (``models.scan.linear_scan``), the route
  that would admit input-dependent Lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.kernels.fftconv import ssm_conv
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.ssm import DT_MAX, DT_MIN, SSM_OPTIM
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.roles import row_linear
from hybrid_pretrain.models.scan import linear_scan

MODES = ("fft", "scan")


@dataclass
class DLROptions:
    """``model.options.dlr``: state size N (0: model.h3_d_state) and the compute path."""

    d_state: int = 0
    mode: str = "fft"

    def validate(self, name: str) -> None:
        if self.d_state < 0 or self.d_state == 1:
            raise ConfigError(f"model.options.{name}.d_state must be 0 or >= 2 (conjugate pairs), got {self.d_state}")
        if self.mode not in MODES:
            raise ConfigError(f"model.options.{name}.mode must be one of {', '.join(MODES)}, got '{self.mode}'")


class DLR(nn.Module):
    """DLR mixer: ``forward(x (B, L, D)) -> (B, L, D)``; recurrent ``allocate_state``/``step``/``prefill``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        opts = layer_options(cfg, "dlr", DLROptions)
        self.layer_idx = layer_idx
        self.d_model, self.mode = cfg.d_model, opts.mode
        self.n_modes = (opts.d_state or cfg.h3_d_state) // 2
        self.log_nu = nn.Parameter(torch.empty(cfg.d_model, self.n_modes))  # |Lambda| = exp(-exp(log_nu))
        self.theta = nn.Parameter(torch.empty(cfg.d_model, self.n_modes))  # arg Lambda
        self.C = nn.Parameter(torch.empty(cfg.d_model, self.n_modes, 2))
        self.D = nn.Parameter(torch.empty(cfg.d_model))
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Lambda starts where discretised S4D-Lin would: exp(dt (-1/2 + i pi n)), dt log-uniform per channel."""
        with torch.no_grad():
            dt = torch.empty(self.d_model, 1, device=self.theta.device).uniform_(math.log(DT_MIN), math.log(DT_MAX))
            dt = dt.exp()
            n = torch.arange(self.n_modes, device=self.theta.device, dtype=self.theta.dtype)
            self.log_nu.copy_(torch.log(0.5 * dt).expand_as(self.log_nu))
            self.theta.copy_(math.pi * n * dt)
            # C ~ S4D's C dB with dB ~ dt: the same kernel S4D starts from, instead of one summing ~1/dt inputs.
            nn.init.normal_(self.C, std=math.sqrt(0.5))
            self.C.mul_(dt.unsqueeze(-1))
            nn.init.normal_(self.D)
        for p in (self.log_nu, self.theta):
            p._optim = dict(SSM_OPTIM)

    def log_lambda(self) -> torch.Tensor:
        """log Lambda = -exp(nu) + i theta: complex (H, N/2), fp32 at least (powers of Lambda need it)."""
        real = torch.float64 if self.C.dtype == torch.float64 else torch.float32
        return torch.complex(-self.log_nu.to(real).exp(), self.theta.to(real))

    def _C(self) -> torch.Tensor:
        real = torch.float64 if self.C.dtype == torch.float64 else torch.float32
        return torch.view_as_complex(self.C.to(real).contiguous())  # (H, N/2)

    def _readout(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(y.to(u.dtype), approximate="tanh"))

    def _states(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> every state x_k: complex (B, L, H, N/2), by the associative scan."""
        log_lam = self.log_lambda()
        return linear_scan(log_lam.exp(), x.to(log_lam.dtype).unsqueeze(-1), dim=1)  # B = 1 per mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        if self.mode == "scan":
            y = 2 * (self._states(x) * self._C()).sum(-1).real + self.D * x  # (B, L, H)
            return self._readout(y, x)
        log_lam = self.log_lambda()
        # ssm_conv's x_t = exp(dtA) x_t-1 + dB u_t with dtA = log Lambda and dB = 1 is exactly DLR.
        y = ssm_conv(x.transpose(1, 2), log_lam, torch.ones_like(log_lam), self._C(), self.D)  # (B, H, L)
        return self._readout(y.transpose(1, 2), x)

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """Complex state (B, D, N/2), constant in sequence length (`max_len` keeps the interface uniform)."""
        cdtype = torch.complex128 if self.C.dtype == torch.float64 else torch.complex64
        shape = (batch_size, self.d_model, self.n_modes)
        return {"ssm": torch.zeros(shape, device=device or self.C.device, dtype=cdtype)}

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D); replaces `state["ssm"]` with the next state."""
        state["ssm"] = self.log_lambda().exp() * state["ssm"] + x_t.unsqueeze(-1).to(state["ssm"].dtype)
        y = 2 * (state["ssm"] * self._C()).sum(-1).real + self.D * x_t  # (B, D)
        return self._readout(y, x_t)

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), leaving `state` as if `step` had read the L positions (from a zero state)."""
        log_lam = self.log_lambda()
        ages = torch.arange(x.shape[1] - 1, -1, -1, device=x.device, dtype=log_lam.real.dtype)  # (L,)
        decay = torch.exp(log_lam.unsqueeze(-1) * ages)  # (H, N/2, L): Lambda^(L-1-s)
        state["ssm"] = torch.einsum("blh,hnl->bhn", x.to(decay.dtype), decay)  # sum_s Lambda^(L-1-s) u_s
        return self.forward(x)
