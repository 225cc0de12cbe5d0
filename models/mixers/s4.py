"""S4 layer (Gu, Goel, Re 2022, "Efficiently Modeling Long Sequences with Structured State Spaces").

    y = W_o GELU(SSM(x))     one SSM per channel, state matrix A = diag(Lambda) - P P^* (DPLR)

A starts as HiPPO-LegS in its normal-plus-low-rank form (``models.ssm.hippo.nplr_legs``), the system is
discretised with the bilinear transform, and training computes the length-L convolution kernel through
the generating function at the roots of unity (Cauchy sums + Woodbury, ``models.ssm.cauchy``), never
powering A. Generation runs the same discretised DPLR recurrence with A materialised (N/2 x N/2 per channel).

Options (``model.options.s4``): d_state (0: model.h3_d_state), dt_min/dt_max, bidirectional. With
bidirectional=true the layer adds an anti-causal kernel (S4's bidirectional mode): it sees the future,
suits classification only, and has no step().
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.ssm import SSM_OPTIM
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.ssm.bidirectional import refuse_step
from hybrid_pretrain.models.ssm.cauchy import bilinear, dplr_kernel
from hybrid_pretrain.models.ssm.conv_mixer import ConvSSMMixer
from hybrid_pretrain.models.ssm.hippo import nplr_legs


@dataclass
class S4Options:
    d_state: int = 0  # real state size N (N/2 complex modes); 0: model.h3_d_state
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    bidirectional: bool = False

    def validate(self, name: str) -> None:
        if self.d_state and (self.d_state < 2 or self.d_state % 2):
            raise ConfigError(f"model.options.{name}.d_state must be an even integer >= 2, got {self.d_state}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"model.options.{name}: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


def _real_dtype(t: torch.Tensor) -> torch.dtype:
    """Kernels need at least fp32 (powers of A over thousands of steps); fp64 parameters stay fp64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class DPLRSSM(nn.Module):
    """``channels`` independent DPLR SSMs with N/2 complex modes each, output 2 Re(C x) (conjugate pairs).

    Parameters: log_dt (H,), Lambda as log(-Re) and Im (H, N/2), P, B, C as (re, im) pairs (H, N/2, 2).
    """

    def __init__(self, channels: int, d_state: int, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        self.channels, self.n_modes = channels, d_state // 2
        self.dt_min, self.dt_max = dt_min, dt_max
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.log_A_real = nn.Parameter(torch.empty(channels, self.n_modes))  # Re Lambda = -exp(.) < 0: stable
        self.A_imag = nn.Parameter(torch.empty(channels, self.n_modes))
        self.P = nn.Parameter(torch.empty(channels, self.n_modes, 2))
        self.B = nn.Parameter(torch.empty(channels, self.n_modes, 2))
        self.C = nn.Parameter(torch.empty(channels, self.n_modes, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the reference code: HiPPO-LegS NPLR for (Lambda, P, B) in every channel, C ~ complex N(0, 1),
        # dt log-uniform in [dt_min, dt_max].
        lam, P, B = nplr_legs(2 * self.n_modes)
        with torch.no_grad():
            nn.init.uniform_(self.log_dt, math.log(self.dt_min), math.log(self.dt_max))
            self.log_A_real.copy_(torch.log(-lam.real).to(self.log_A_real.dtype).expand_as(self.log_A_real))
            self.A_imag.copy_(lam.imag.to(self.A_imag.dtype).expand_as(self.A_imag))
            self.P.copy_(torch.view_as_real(P).to(self.P.dtype).expand_as(self.P))
            self.B.copy_(torch.view_as_real(B).to(self.B.dtype).expand_as(self.B))
            nn.init.normal_(self.C, std=math.sqrt(0.5))
        for p in (self.log_dt, self.log_A_real, self.A_imag, self.P, self.B):
            p._optim = dict(SSM_OPTIM)  # S4 trains A, P, B and dt with a small LR and no weight decay

    def system(self) -> tuple[torch.Tensor, ...]:
        """Continuous parameters (Lambda, P, B, C complex (H, N/2); dt real (H,)) in the compute dtype."""
        dtype = _real_dtype(self.log_dt)

        def cplx(t: torch.Tensor) -> torch.Tensor:
            return torch.view_as_complex(t.to(dtype).contiguous())

        lam = torch.complex(-self.log_A_real.to(dtype).exp(), self.A_imag.to(dtype))
        return lam, cplx(self.P), cplx(self.B), cplx(self.C), self.log_dt.to(dtype).exp()

    def kernel(self, length: int) -> torch.Tensor:
        """Real convolution kernel (H, length) = 2 Re(C dA^k dB), via the generating function."""
        lam, P, B, C, dt = self.system()
        return 2 * dplr_kernel(lam, P, B, C, dt, length).real

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dA (H, N/2, N/2), dB (H, N/2), C (H, N/2)): the bilinear DPLR system, materialised for step()."""
        lam, P, B, C, dt = self.system()
        dA, dB = bilinear(lam, P, B, dt)
        return dA, dB, C


class S4(ConvSSMMixer):
    """S4 mixer: ``forward(x (B, L, D)) -> (B, L, D)``; causal ones also ``allocate_state``/``step``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        opts = layer_options(cfg, "s4", S4Options)
        kernels = 2 if opts.bidirectional else 1  # bidirectional: a causal and an anti-causal SSM per channel
        ssm = DPLRSSM(kernels * cfg.d_model, opts.d_state or cfg.h3_d_state, opts.dt_min, opts.dt_max)
        super().__init__(cfg.d_model, layer_idx, ssm, opts.bidirectional)

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """Complex SSM state (B, D, N/2), constant in length (`max_len` keeps the interface uniform)."""
        if self.bidirectional:
            raise refuse_step("s4")
        cdtype = torch.complex128 if _real_dtype(self.D) == torch.float64 else torch.complex64
        shape = (batch_size, self.d_model, self.ssm.n_modes)
        return {"ssm": torch.zeros(shape, dtype=cdtype, device=device or self.D.device)}

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D); x = dA x + dB u, y = 2 Re(C x) + D u; replaces `state["ssm"]`."""
        if self.bidirectional:
            raise refuse_step("s4")
        dA, dB, C = self.ssm.discretize()  # (D, N, N), (D, N), (D, N)
        s = torch.einsum("hmn,bhn->bhm", dA, state["ssm"]) + dB * x_t.unsqueeze(-1).to(dB.dtype)  # (B, D, N)
        state["ssm"] = s
        y = (2 * (C * s).sum(-1).real + self.D * x_t).to(x_t.dtype)  # (B, D)
        return self.out_proj(F.gelu(y, approximate="tanh"))
