"""DSS layer (Gupta, Gu, Berant 2022, "Diagonal State Spaces are as Effective as Structured State Spaces").

    y = W_o GELU(SSM(x))     one diagonal SSM per channel with the DSS-softmax kernel

The state matrix is diagonal, initialised with the eigenvalues of HiPPO-LegS's normal part (Re = -1/2),
and the kernel is ``Re(W . Lambda^-1 (exp(Lambda dt) - 1) . row_softmax(Lambda k dt))`` (``models.ssm.dss_kernel``):
the softmax over positions lets Re(Lambda) drift to either sign without the kernel blowing up. The
normalisation runs over ``kernel_len`` positions (option, default model.max_seq_len), the longest input
the layer accepts; shorter inputs use the kernel's first L taps, so forward and the recurrent step()
(``x = exp(Lambda dt) x + u``, ``y = Re(c x)``) agree for every length.

Options (``model.options.dss``): d_state (0: model.h3_d_state; N/2 complex modes), dt_min/dt_max,
kernel_len, bidirectional (adds an anti-causal kernel: not causal, no step()).
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
from hybrid_pretrain.models.ssm.conv_mixer import ConvSSMMixer
from hybrid_pretrain.models.ssm.dss_kernel import dss_recurrence, dss_softmax_kernel
from hybrid_pretrain.models.ssm.hippo import s4d_legs


@dataclass
class DSSOptions:
    d_state: int = 0  # N (N/2 complex modes); 0: model.h3_d_state
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    kernel_len: int = 0  # softmax normalisation length = longest input; 0: model.max_seq_len
    bidirectional: bool = False

    def validate(self, name: str) -> None:
        if self.d_state and (self.d_state < 2 or self.d_state % 2):
            raise ConfigError(f"model.options.{name}.d_state must be an even integer >= 2, got {self.d_state}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"model.options.{name}: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.kernel_len < 0:
            raise ConfigError(f"model.options.{name}.kernel_len must be >= 0 (0: model.max_seq_len)")


class DSSKernel(nn.Module):
    """``channels`` diagonal SSMs with the DSS-softmax kernel over `length` positions; also used inside GSS.

    Parameters: log_dt (H,), Lambda as real and imaginary parts (H, N/2) (unconstrained: the softmax
    normalisation keeps the kernel bounded), W as (re, im) (H, N/2, 2).
    """

    def __init__(self, channels: int, d_state: int, length: int, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        self.channels, self.n_modes, self.length = channels, d_state // 2, length
        self.dt_min, self.dt_max = dt_min, dt_max
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.Lambda_re = nn.Parameter(torch.empty(channels, self.n_modes))
        self.Lambda_im = nn.Parameter(torch.empty(channels, self.n_modes))
        self.W = nn.Parameter(torch.empty(channels, self.n_modes, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the paper: Lambda = eigenvalues of HiPPO-LegS's normal part (S4D-LegS), W ~ complex N(0, 1),
        # dt log-uniform in [dt_min, dt_max].
        lam, _ = s4d_legs(self.n_modes)
        with torch.no_grad():
            nn.init.uniform_(self.log_dt, math.log(self.dt_min), math.log(self.dt_max))
            self.Lambda_re.copy_(lam.real.to(self.Lambda_re.dtype).expand_as(self.Lambda_re))
            self.Lambda_im.copy_(lam.imag.to(self.Lambda_im.dtype).expand_as(self.Lambda_im))
            nn.init.normal_(self.W, std=math.sqrt(0.5))
        for p in (self.log_dt, self.Lambda_re, self.Lambda_im):
            p._optim = dict(SSM_OPTIM)  # the paper trains Lambda and dt with a small LR and no weight decay

    def system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Lambda, W complex (H, N/2); dt (H,)) in fp32 (fp64 for fp64 parameters)."""
        dtype = torch.float64 if self.log_dt.dtype == torch.float64 else torch.float32
        lam = torch.complex(self.Lambda_re.to(dtype), self.Lambda_im.to(dtype))
        return lam, torch.view_as_complex(self.W.to(dtype).contiguous()), self.log_dt.to(dtype).exp()

    def kernel(self, keep: int) -> torch.Tensor:
        """The first `keep` taps of the kernel normalised over `self.length`: real (H, keep)."""
        if keep > self.length:
            raise ValueError(
                f"DSS input of length {keep} exceeds its kernel_len {self.length}; raise model.max_seq_len "
                "or model.options.<dss|gss>.kernel_len"
            )
        return dss_softmax_kernel(*self.system(), self.length, keep)

    def allocate_state(self, batch_size: int, device: torch.device | None = None) -> dict:
        """Zero complex state (B, H, N/2) and the position, since the kernel is defined up to `length`."""
        cdtype = torch.complex128 if self.log_dt.dtype == torch.float64 else torch.complex64
        zeros = torch.zeros(batch_size, self.channels, self.n_modes, dtype=cdtype, device=device or self.W.device)
        return {"ssm": zeros, "pos": 0}

    def step(self, u_t: torch.Tensor, state: dict) -> torch.Tensor:
        """u_t: (B, H) -> y_t (B, H) (no skip term): x = z x + u, y = Re(sum c x), the kernel's recurrent view."""
        if state["pos"] >= self.length:
            raise ValueError(f"DSS step past its kernel_len {self.length}: the softmax kernel is defined up to there")
        z, c = dss_recurrence(*self.system(), self.length)  # (H, N/2) each
        s = z * state["ssm"] + u_t.unsqueeze(-1).to(z.dtype)  # (B, H, N/2)
        state["ssm"], state["pos"] = s, state["pos"] + 1
        return (c * s).sum(-1).real.to(u_t.dtype)


class DSS(ConvSSMMixer):
    """DSS mixer: ``forward(x (B, L, D)) -> (B, L, D)``; causal ones also ``allocate_state``/``step``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        opts = layer_options(cfg, "dss", DSSOptions)
        kernels = 2 if opts.bidirectional else 1  # bidirectional: a causal and an anti-causal SSM per channel
        ssm = DSSKernel(kernels * cfg.d_model, opts.d_state or cfg.h3_d_state, opts.kernel_len or cfg.max_seq_len,
                        opts.dt_min, opts.dt_max)
        super().__init__(cfg.d_model, layer_idx, ssm, opts.bidirectional)

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """Complex state (B, D, N/2) and position; stepping past kernel_len is refused."""
        if self.bidirectional:
            raise refuse_step("dss")
        return self.ssm.allocate_state(batch_size, device)

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D); replaces the entries of `state`."""
        if self.bidirectional:
            raise refuse_step("dss")
        y = self.ssm.step(x_t, state) + self.D * x_t  # (B, D)
        return self.out_proj(F.gelu(y, approximate="tanh"))

