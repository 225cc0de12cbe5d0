"""S5 layer (Smith, Warrington & Linderman 2023, "Simplified State Space Layers for Sequence Modeling").

    x_k = Lambda_bar x_k-1 + B_bar u_k,   y_k = 2 Re(C x_k) + D u_k,   out = W_o GELU(y)

One multi-input multi-output SSM for all H channels: a state of P complex modes (P/2 stored, conjugate
symmetry), complex diagonal Lambda from the diagonalised normal part of HiPPO-LegS (HiPPO-N), B (P x H),
C (H x P), D (H,), zero-order hold with one timescale per state. Unlike S4/S4D there is no convolution
kernel: the recurrence itself is run by a parallel associative scan (`models.scan.linear_scan`), which is
what makes time-varying or bidirectional variants cheap. Bidirectional (the paper's LRA setting): a second
scan runs backwards over the same Lambda_bar, B_bar and is read out by its own C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.ssm import DT_MAX, DT_MIN, SSM_OPTIM, _expm1
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.roles import row_linear
from hybrid_pretrain.models.scan import linear_scan


@dataclass
class S5Options:
    """``model.options.s5``: state size P (0: model.h3_d_state), HiPPO blocks J, direction."""

    d_state: int = 0
    blocks: int = 1  # J: Lambda initialised as J independent HiPPO-N blocks of size P/J (the paper's Sec. 4.3)
    bidirectional: bool = False

    def validate(self, name: str) -> None:
        if self.d_state < 0 or self.blocks <= 0:
            raise ConfigError(f"model.options.{name}: d_state must be >= 0 and blocks > 0, got {self}")


def hippo_n(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of HiPPO-N, the normal part of HiPPO-LegS: (Lambda (n,), V (n, n)), complex128.

    A_LegS = S - P P^T with S normal; its eigenvalues are -1/2 + i w (w from the skew-symmetric part), as
    the S5 reference (``make_DPLR_HiPPO``) computes them.
    """
    q = torch.arange(n, dtype=torch.float64, device="cpu")
    p = torch.sqrt(1 + 2 * q)
    A = -(torch.tril(p[:, None] * p[None, :]) - torch.diag(q))  # HiPPO-LegS
    pp = torch.sqrt(q + 0.5)
    S = A + pp[:, None] * pp[None, :]  # normal part: -1/2 on the diagonal, skew-symmetric off it
    w, V = torch.linalg.eigh(S.to(torch.complex128) * -1j)  # S = i (-iS), -iS Hermitian
    Lambda = torch.complex(S.diagonal().mean().expand(n), w)
    return Lambda, V


class S5(nn.Module):
    """S5 mixer: ``forward(x (B, L, D)) -> (B, L, D)``; causal ones also ``allocate_state``/``step``/``prefill``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        opts = layer_options(cfg, "s5", S5Options)
        self.layer_idx = layer_idx
        self.d_model = H = cfg.d_model
        self.d_state = opts.d_state or cfg.h3_d_state
        self.blocks, self.bidirectional = opts.blocks, opts.bidirectional
        if self.d_state % (2 * self.blocks):
            raise ConfigError(
                f"model.options.s5: d_state ({self.d_state}) must be divisible by 2 * blocks ({2 * self.blocks}) "
                "so each HiPPO block has conjugate pairs"
            )
        P2 = self.d_state // 2  # stored modes (the other half are their conjugates)
        self.log_neg_Lambda_real = nn.Parameter(torch.empty(P2))  # Re Lambda = -exp(.) < 0: stable
        self.Lambda_imag = nn.Parameter(torch.empty(P2))
        self.log_step = nn.Parameter(torch.empty(P2))
        self.B = nn.Parameter(torch.empty(P2, H, 2))  # V^-1 B as (re, im)
        self.C = nn.Parameter(torch.empty(1 + self.bidirectional, H, P2, 2))  # C V as (re, im), one per direction
        self.D = nn.Parameter(torch.empty(H))
        self.out_proj = row_linear(H, H)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """HiPPO-N blocks for Lambda; B, C lecun-normal then rotated into the eigenbasis; log-uniform steps."""
        for p in (self.log_neg_Lambda_real, self.Lambda_imag, self.log_step, self.B):
            p._optim = dict(SSM_OPTIM)  # the paper's smaller "SSM learning rate", no weight decay
        if self.B.device.type == "meta":  # shapes only (parameter counts, meta-built models)
            return
        P, J, H = self.d_state, self.blocks, self.d_model
        Lambda, V = hippo_n(P // J)
        half = P // J // 2
        Lambda, V = Lambda[:half], V[:, :half]  # one of each conjugate pair
        Lambda, V = Lambda.repeat(J), torch.block_diag(*[V] * J)  # (P/2,), (P, P/2)
        with torch.no_grad():
            self.log_neg_Lambda_real.copy_(torch.log(-Lambda.real))
            self.Lambda_imag.copy_(Lambda.imag)
            self.log_step.uniform_(math.log(DT_MIN), math.log(DT_MAX))
            B = torch.randn(P, H, dtype=torch.float64, device="cpu") / math.sqrt(H)  # lecun normal, fan-in H
            VinvB = V.conj().T @ B.to(torch.complex128)  # (P/2, H)
            self.B.copy_(torch.view_as_real(VinvB))
            shape = (self.C.shape[0], H, P)
            C = torch.complex(torch.randn(shape, dtype=torch.float64, device="cpu"),
                              torch.randn(shape, dtype=torch.float64, device="cpu")) / math.sqrt(2 * P)
            self.C.copy_(torch.view_as_real(C @ V))  # (dirs, H, P/2)
            nn.init.normal_(self.D)

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZOH: Lambda_bar = exp(step Lambda), B_bar = (Lambda_bar - 1) / Lambda B.

        Returns Lambda_bar (P/2,), B_bar (P/2, H), C (dirs, H, P/2), complex64 (complex128 for fp64 params).
        """
        real = torch.float64 if self.B.dtype == torch.float64 else torch.float32
        Lambda = torch.complex(-self.log_neg_Lambda_real.to(real).exp(), self.Lambda_imag.to(real))  # (P/2,)
        dtL = self.log_step.to(real).exp() * Lambda
        B = torch.view_as_complex(self.B.to(real).contiguous())  # (P/2, H)
        B_bar = (_expm1(dtL) / Lambda).unsqueeze(-1) * B
        return dtL.exp(), B_bar, torch.view_as_complex(self.C.to(real).contiguous())

    def _readout(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu((y + self.D * u.to(y.dtype)).to(u.dtype), approximate="tanh"))

    def _scan(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, D) -> (layer output (B, L, D), forward states (B, L, P/2))."""
        Lambda_bar, B_bar, C = self.discretize()
        Bu = torch.einsum("blh,ph->blp", x.to(B_bar.dtype), B_bar)  # (B, L, P/2)
        states = linear_scan(Lambda_bar, Bu, dim=1)  # (B, L, P/2)
        y = 2 * torch.einsum("blp,hp->blh", states, C[0]).real  # (B, L, H)
        if self.bidirectional:
            back = linear_scan(Lambda_bar, Bu, dim=1, reverse=True)  # (B, L, P/2): x_k = Lambda_bar x_k+1 + B_bar u_k
            y = y + 2 * torch.einsum("blp,hp->blh", back, C[1]).real
        return self._readout(y, x), states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        return self._scan(x)[0]

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """Complex state (B, P/2), constant in sequence length (`max_len` keeps the interface uniform)."""
        if self.bidirectional:
            raise RuntimeError("a bidirectional S5 layer reads the future and cannot be stepped; use forward()")
        cdtype = torch.complex128 if self.B.dtype == torch.float64 else torch.complex64
        return {"ssm": torch.zeros(batch_size, self.d_state // 2, device=device or self.B.device, dtype=cdtype)}

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D); replaces `state["ssm"]` with the next state."""
        Lambda_bar, B_bar, C = self.discretize()
        state["ssm"] = Lambda_bar * state["ssm"] + x_t.to(B_bar.dtype) @ B_bar.T  # (B, P/2)
        return self._readout(2 * (state["ssm"] @ C[0].T).real, x_t)

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), leaving `state` as if `step` had read the L positions (from a zero state)."""
        y, states = self._scan(x)
        state["ssm"] = states[:, -1]
        return y
