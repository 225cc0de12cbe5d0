"""The two state-space models inside H3 (Fu et al. 2023, "Hungry Hungry Hippos", Sec. 3).

Both are linear time-invariant SSMs ``x_t = A x_{t-1} + B u_t, y_t = C x_t + D u_t`` run
independently per channel. Training evaluates them as a causal convolution with the kernel
``K[l] = C A^l B``; generation runs the recurrence one step at a time.

- ``ShiftSSM``: A is the shift matrix and B = e1, so the state is the last N inputs and the kernel
  is just C (a learnable causal filter of length N, run as an N-tap ``kernels.causal_conv``). It lets
  H3 compare tokens with their recent past.
- ``DiagonalSSM``: A is diagonal complex (S4D-Lin init), discretised with zero-order hold, so the
  state is an exponentially decaying, oscillating summary of the whole past (the "memory"). Its kernel
  and its state after a prompt are Vandermonde products (``kernels.vandermonde``), its convolution an
  FFT one (``kernels.fftconv.ssm_conv``; on CPU, training sequences from 1K steps run by chunks instead,
  ``kernels.ssm_chunked``, without the full-length kernel).

Under bf16 (DeepSpeed casts the parameters too) the SSM keeps fp32 islands: ``discretize`` upcasts the
parameters, the kernel (Vandermonde) and the FFT convolution run in fp32 and only the output returns to
bf16; the shift SSM's short filter runs in bf16 like a linear layer. Rounding ``log_dt`` and ``A_imag``
themselves to bf16 moves the layer's output most (kernels/README.md, "Precision under bf16").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.kernels.causal_conv import causal_conv
from hybrid_pretrain.kernels.fftconv import ssm_conv, ssm_kernel
from hybrid_pretrain.kernels.vandermonde import transpose_tables, vandermonde_transpose

SSM_OPTIM = {"weight_decay": 0.0, "lr": 1e-3}  # S4 recipe: A and dt train slowly and without decay
DT_MIN, DT_MAX = 1e-3, 1e-1


def _real_dtype(t: torch.Tensor) -> torch.dtype:
    """SSM kernels and states need at least fp32: A^l over thousands of steps loses bf16 precision."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expm1(z: torch.Tensor) -> torch.Tensor:
    """exp(z) - 1 for complex z without cancellation: |dt A| is ~1e-3, where exp(z) - 1 loses 3 digits in fp32."""
    a, b = z.real, z.imag
    real = torch.expm1(a) * torch.cos(b) - 2 * torch.sin(b / 2) ** 2
    return torch.complex(real, torch.exp(a) * torch.sin(b))


def _frozen(module: nn.Module, name: str, params: tuple[torch.Tensor, ...], compute):
    """``compute()``, cached on `module` while `params` keep their storage and version counter, without autograd.

    Decoding steps reuse what depends only on the weights (discretisation, folded taps) instead of
    recomputing it per token; any in-place update (an optimizer step, ``load_state_dict``) or a move to
    another device or dtype invalidates it. With autograd on it is always recomputed (and never cached).
    """
    if torch.is_grad_enabled():
        return compute()
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        module.__dict__[name] = cached
    return cached[1]


class ShiftSSM(nn.Module):
    """Shift SSM: A = shift matrix, B = e1 (fixed), learnable C (H, N), skip D (H,).

    With B = e1 the state after step t is (u_t, u_{t-1}, ..., u_{t-N+1}), so y_t = sum_n C_n u_{t-n}:
    the convolution kernel is C itself, zero beyond length N. B and A are therefore not stored.
    """

    def __init__(self, channels: int, d_state: int) -> None:
        super().__init__()
        self.channels, self.d_state = channels, d_state
        self.C = nn.Parameter(torch.empty(channels, d_state))
        self.D = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the reference code: C like a Conv1d weight of fan-in N (kaiming_uniform, a=sqrt(5)), D ~ N(0, 1).
        bound = 1.0 / math.sqrt(self.d_state)
        with torch.no_grad():
            nn.init.uniform_(self.C, -bound, bound)
            nn.init.normal_(self.D)

    def kernel(self, length: int) -> torch.Tensor:
        """Convolution kernel K[l] = C A^l B = C[:, l], cut or zero-padded to `length`: (H, length)."""
        return F.pad(self.C, (0, max(0, length - self.d_state)))[:, :length]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, H, L) -> y: (B, H, L): an N-tap causal convolution, O(L N), instead of an FFT over L."""
        return causal_conv(u, self.C, self.D)

    def allocate_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Zero state (B, H, N): the last N inputs, most recent first."""
        return torch.zeros(
            batch_size, self.channels, self.d_state, device=device or self.C.device, dtype=dtype or self.C.dtype
        )

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t: (B, H), state: (B, H, N) -> (y_t (B, H), next state (B, H, N))."""
        state = torch.cat([u_t.unsqueeze(-1).to(state.dtype), state[..., :-1]], dim=-1)  # x = A x + B u
        taps = _frozen(self, "_step_taps", (self.C, self.D),  # D folded into tap 0: y = taps . x
                       lambda: torch.cat([self.C[:, :1] + self.D.unsqueeze(-1), self.C[:, 1:]], dim=-1))
        return torch.einsum("bhn,hn->bh", state, taps.to(state.dtype)).to(u_t.dtype), state


class DiagonalSSM(nn.Module):
    """Diagonal complex SSM (S4D), one per channel, with N/2 complex modes standing for N real states.

    Modes come in conjugate pairs, so only half are stored and the output is 2 Re(C x). The input
    matrix B is folded into C (only their product enters the kernel and the recurrence).
    Parameters: log_dt (H,), A as log(-Re A) (H, N/2) and Im A (H, N/2), C as (re, im) (H, N/2, 2), D (H,).
    """

    def __init__(self, channels: int, d_state: int) -> None:
        super().__init__()
        if d_state < 2:
            raise ValueError(f"DiagonalSSM needs d_state >= 2 (conjugate pairs), got {d_state}")
        self.channels, self.n_modes = channels, d_state // 2
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.log_A_real = nn.Parameter(torch.empty(channels, self.n_modes))  # Re A = -exp(.) stays negative: stable
        self.A_imag = nn.Parameter(torch.empty(channels, self.n_modes))
        self.C = nn.Parameter(torch.empty(channels, self.n_modes, 2))
        self.D = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # S4D-Lin: A_n = -1/2 + i*pi*n; dt log-uniform in [DT_MIN, DT_MAX]; C ~ complex N(0, 1); D ~ N(0, 1).
        with torch.no_grad():
            nn.init.uniform_(self.log_dt, math.log(DT_MIN), math.log(DT_MAX))
            nn.init.constant_(self.log_A_real, math.log(0.5))
            n = torch.arange(self.n_modes, device=self.A_imag.device, dtype=self.A_imag.dtype)
            self.A_imag.copy_(math.pi * n.expand_as(self.A_imag))
            nn.init.normal_(self.C, std=math.sqrt(0.5))
            nn.init.normal_(self.D)
        for p in (self.log_dt, self.log_A_real, self.A_imag):
            p._optim = dict(SSM_OPTIM)  # re-attached here so a meta-built model keeps them after to_empty()

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero-order hold: dA = exp(dt A), dB = (exp(dt A) - 1) / A. Returns (dtA, dB, C), each complex (H, N/2)."""
        dtype = _real_dtype(self.log_dt)
        dt = self.log_dt.to(dtype).exp().unsqueeze(-1)  # (H, 1)
        A = torch.complex(-self.log_A_real.to(dtype).exp(), self.A_imag.to(dtype))  # (H, N/2)
        dtA = dt * A
        dB = _expm1(dtA) / A
        C = torch.view_as_complex(self.C.to(dtype).contiguous())  # (H, N/2)
        return dtA, dB, C

    def discretized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``discretize()``, taken from ``_inference_cache`` when autograd is off: what every user of (dtA, dB, C)
        calls, so prefill, evaluation and decoding discretise once per weight update, not once per call."""
        if torch.is_grad_enabled():
            return self.discretize()
        return self._inference_cache()["discrete"]

    def kernel(self, length: int) -> torch.Tensor:
        """K[l] = 2 Re(sum_n C_n dB_n exp(dtA_n l)), l = 0 .. length-1: (H, length) in fp32 (fp64 for fp64 params)."""
        if not torch.is_grad_enabled():
            return self._inference_kernel(length)
        return ssm_kernel(*self.discretize(), length)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, H, L) -> y: (B, H, L). ``ssm_conv`` takes the SSM itself, not its kernel, so that sequences
        beyond one fused convolution can be run by state passing (carrying x between chunks). Without
        autograd (prefill, evaluation) the kernel comes from ``_inference_cache``."""
        return ssm_conv(u, *self.discretized(), self.D, None if torch.is_grad_enabled() else self._inference_kernel)

    # Distinct (length, rows) shapes whose prefill-state tables are kept: a few prompt lengths at once.
    KEPT_TABLES = 4

    def _inference_cache(self) -> dict:
        """What depends on the weights alone, kept while they are unchanged and autograd is off (``_frozen``):
        "discrete" (dtA, dB, C), "step" (``step_constants``), "kernel" (the longest asked, as any shorter
        one is its prefix) and "tables", the transpose product's power tables per (length, rows). With
        autograd on it is a fresh dict each call, so everything taken from it is differentiable. Prefill and
        evaluation then skip building the Vandermonde tables, ~25% of an H3 layer's prefill at d_model 768,
        L 512. Dropped by ``train()``, so evaluation during training does not keep it through training steps."""
        return _frozen(self, "_inference", (self.log_dt, self.log_A_real, self.A_imag, self.C),
                       lambda: {"discrete": self.discretize(), "tables": {}})

    def train(self, mode: bool = True) -> DiagonalSSM:
        if mode:
            self.__dict__.pop("_inference", None)
        return super().train(mode)

    def _inference_kernel(self, length: int) -> torch.Tensor:
        cache = self._inference_cache()
        if "kernel" not in cache or cache["kernel"].shape[-1] < length:
            cache["kernel"] = ssm_kernel(*cache["discrete"], length)
        return cache["kernel"][:, :length]

    def allocate_state(self, batch_shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
        """Zero state (*batch_shape, H, N/2), complex.

        The recurrent state is kept scaled by the output matrix, s = C x (per mode), so that a step's
        readout 2 Re(sum_n C_n x_n) is a plain sum; zero either way.
        """
        cdtype = torch.complex128 if _real_dtype(self.log_dt) == torch.float64 else torch.complex64
        return torch.zeros(*batch_shape, self.channels, self.n_modes, device=device or self.C.device, dtype=cdtype)

    def state_after(self, u: torch.Tensor) -> torch.Tensor:
        """The state ``step`` reaches from zero after reading all of u: (..., H, L) -> complex (..., H, N/2).

        s_{L-1} = C dB sum_s dA^(L-1-s) u_s is the transpose Vandermonde product of u read backwards: one
        pass of chunked matmuls, so a prompt's state costs about what its convolution does.
        """
        if torch.is_grad_enabled():
            dtA, dB, C = self.discretize()
            return C * dB * vandermonde_transpose(u.flip(-1), dtA)  # (..., H, N/2)
        cache = self._inference_cache()
        dtA, dB, C = cache["discrete"]
        tables, key = cache["tables"], (u.shape[-1], u[..., 0, 0].numel())  # what the chunking depends on
        if key not in tables:
            while len(tables) >= self.KEPT_TABLES:
                del tables[next(iter(tables))]  # the oldest first
            tables[key] = transpose_tables(dtA, *key)
        return C * dB * vandermonde_transpose(u.flip(-1), dtA, tables=tables[key])

    def step_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dA, C dB), each complex (H, N/2): what one recurrent step multiplies by.

        Without autograd they are kept with the rest of ``_inference_cache`` while the weights are unchanged,
        so a decoding step does no exp and no discretisation, just two fused ops.
        """
        cache = self._inference_cache()
        if "step" not in cache:
            dtA, dB, C = cache["discrete"]
            cache["step"] = (torch.exp(dtA), C * dB)
        return cache["step"]

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t: (..., H), state s = C x: (..., H, N/2) complex -> (y_t (..., H), next state).

        s_t = dA s_{t-1} + C dB u_t and y_t = 2 Re(sum_n s_t) + D u_t: one multiply-add and one sum.
        """
        dA, w = self.step_constants()
        state = torch.addcmul(state * dA, w, u_t.unsqueeze(-1).to(w.dtype))
        y_t = 2 * state.real.sum(-1) + self.D * u_t
        return y_t.to(u_t.dtype), state
