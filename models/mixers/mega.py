"""Mega layer (Ma et al. 2023, "Mega: Moving Average Equipped Gated Attention"), with Mega-chunk.

    X'  = SiLU(EMA(X) + omega X)                      multi-dimensional damped EMA, per channel
    Z   = SiLU(X' W_z),  Q = k_q Z + m_q,  K = k_k Z + m_k       one shared Z for queries and keys
    V   = SiLU(X W_v)
    O   = softmax(Q K^T / sqrt(z)) V                  single head, rotary positions, causal
    g   = SiLU(X' W_g)  (reset),  phi = sigmoid(X' W_phi)  (update)
    H^  = SiLU(X' W_h + (g * O) U_h)
    Y   = X + phi * (H^ - X)

The EMA expands each channel j into h dims: h_t = a * b x_t + (1 - a * d) h_t-1, y_t = eta . h_t, with
a, d in (0, 1) (sigmoids), i.e. a causal convolution with the kernel K[t] = sum eta a b (1 - a d)^t that
``kernels.fftconv`` applies in O(L log L). Mega-chunk (``chunk_size`` c > 0) attends only within blocks of
c tokens, making attention linear in L, while the EMA still runs over the whole sequence and carries
information across blocks. The block's own residual is the ``X +`` of models.block.Block, so the mixer
returns ``phi * (H^ - X)`` (the paper's output minus its input). Bidirectional (the paper's LRA setting):
a second EMA reads the sequence backwards and attention sees every position of its chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.kernels.fftconv import fftconv
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.attention import apply_rotary
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.roles import column_linear, row_linear


@dataclass
class MegaOptions:
    """``model.options.mega``: EMA dims h, shared q/k dim z and value dim v (0: d/4 and 2d, the paper's
    ratios), attention chunk c (0: full attention), direction."""

    ema_dim: int = 16
    z_dim: int = 0
    v_dim: int = 0
    chunk_size: int = 0
    bidirectional: bool = False

    def validate(self, name: str) -> None:
        for key in ("ema_dim", "z_dim", "v_dim", "chunk_size"):
            if getattr(self, key) < 0 or (key == "ema_dim" and self.ema_dim == 0):
                raise ConfigError(f"model.options.{name}.{key} must be >= 0 (ema_dim > 0), got {getattr(self, key)}")


class MultiHeadEMA(nn.Module):
    """Damped EMA with h dims per channel: ``forward(u (B, D, L)) -> (B, D, L)``; recurrent ``step``."""

    def __init__(self, channels: int, ema_dim: int, bidirectional: bool = False) -> None:
        super().__init__()
        self.channels, self.ema_dim, self.bidirectional = channels, ema_dim, bidirectional
        dirs = 1 + bidirectional
        self.alpha = nn.Parameter(torch.empty(dirs, channels, ema_dim))  # sigmoid: the input weight a
        self.delta = nn.Parameter(torch.empty(dirs, channels, ema_dim))  # sigmoid: the damping d
        self.beta = nn.Parameter(torch.empty(dirs, channels, ema_dim))  # expansion of x into h dims
        self.eta = nn.Parameter(torch.empty(dirs, channels, ema_dim))  # projection back to one dim
        self.omega = nn.Parameter(torch.empty(channels))  # skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the reference code: a, d ~ sigmoid(N(0, 0.2)); b ~ +-1 alternating + N(0, 0.02); eta, omega ~ N(0, 1).
        with torch.no_grad():
            nn.init.normal_(self.alpha, std=0.2)
            nn.init.normal_(self.delta, std=0.2)
            sign = torch.ones(self.ema_dim, device=self.beta.device)
            sign[1::2] = -1.0
            nn.init.normal_(self.beta, std=0.02)
            self.beta.add_(sign)
            nn.init.normal_(self.eta)
            nn.init.normal_(self.omega)
        for p in (self.alpha, self.delta, self.beta, self.eta):
            p._optim = {"weight_decay": 0.0}  # EMA coefficients, not weight matrices

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input weight a*b, decay q = 1 - a*d, readout eta / sqrt(h)), each (dirs, D, h) in fp32 at least."""
        real = torch.float64 if self.eta.dtype == torch.float64 else torch.float32
        a, d = torch.sigmoid(self.alpha.to(real)), torch.sigmoid(self.delta.to(real))
        return a * self.beta.to(real), 1.0 - a * d, self.eta.to(real) / math.sqrt(self.ema_dim)

    def kernel(self, length: int) -> torch.Tensor:
        """K[t] = sum_h eta a b q^t for t < length: (dirs, D, length)."""
        p, q, eta = self.coefficients()
        t = torch.arange(length, device=q.device, dtype=q.dtype)
        powers = torch.exp(torch.log(q).unsqueeze(-1) * t)  # (dirs, D, h, L)
        return torch.einsum("cdh,cdhl->cdl", p * eta, powers)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, D, L) -> EMA(u) + omega u: (B, D, L)."""
        k = self.kernel(u.shape[-1])  # (dirs, D, L)
        y = fftconv(u, k[0], self.omega)
        if self.bidirectional:
            y = y + fftconv(u.flip(-1), k[1]).flip(-1)  # the same recurrence read from the end
        return y

    def allocate_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Zero EMA state (B, D, h) in fp32 (fp64 for fp64 parameters)."""
        real = torch.float64 if self.eta.dtype == torch.float64 else torch.float32
        return torch.zeros(batch_size, self.channels, self.ema_dim, device=device or self.eta.device, dtype=real)

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t: (B, D), state (B, D, h) -> (y_t (B, D), next state); forward direction only."""
        p, q, eta = self.coefficients()
        state = q[0] * state + p[0] * u_t.unsqueeze(-1).to(state.dtype)  # h_t = q h_t-1 + a b x_t
        y = (eta[0] * state).sum(-1) + self.omega * u_t
        return y.to(u_t.dtype), state


class Mega(nn.Module):
    """Mega mixer: ``forward(x (B, L, D)) -> (B, L, D)``; causal ones also ``allocate_state``/``step``/``prefill``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        opts = layer_options(cfg, "mega", MegaOptions)
        self.layer_idx = layer_idx
        self.d_model = D = cfg.d_model
        self.z_dim, self.v_dim = opts.z_dim or max(1, D // 4), opts.v_dim or 2 * D
        if self.z_dim % 2:
            raise ConfigError(f"model.options.mega.z_dim must be even (rotary pairs), got {self.z_dim}")
        self.chunk_size, self.bidirectional = opts.chunk_size, opts.bidirectional
        self.ema = MultiHeadEMA(D, opts.ema_dim, opts.bidirectional)
        self.v_proj = column_linear(D, self.v_dim)
        # One projection of X' for the update gate (D), Z (z), reset gate (v) and the candidate's W_h X' (D).
        self.mx_proj = column_linear(D, D + self.z_dim + self.v_dim + D)
        self.qk_scale = nn.Parameter(torch.empty(2, self.z_dim))
        self.qk_offset = nn.Parameter(torch.empty(2, self.z_dim))
        self.out_proj = row_linear(self.v_dim, D)  # U_h
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the reference code: Q and K start as small multiples of Z (near-uniform attention).
        with torch.no_grad():
            nn.init.normal_(self.qk_scale, std=0.02)
            nn.init.zeros_(self.qk_offset)

    def _gates(self, x: torch.Tensor, mx: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x, mx: (B, L, D) -> q, k (B, 1, L, z), v (B, 1, L, v), reset (B, L, v), update, W_h X' (B, L, D)."""
        v = F.silu(self.v_proj(x)).unsqueeze(1)  # (B, 1, L, v)
        update, z, reset, hx = self.mx_proj(mx).split([self.d_model, self.z_dim, self.v_dim, self.d_model], dim=-1)
        z = F.silu(z).unsqueeze(1)  # (B, 1, L, z): one head
        q = apply_rotary(z * self.qk_scale[0] + self.qk_offset[0], positions, self.z_dim)
        k = apply_rotary(z * self.qk_scale[1] + self.qk_offset[1], positions, self.z_dim)
        return q, k, v, F.silu(reset), torch.sigmoid(update), hx

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Single-head attention within chunks: q, k (B, 1, L, z), v (B, 1, L, v) -> (B, L, v)."""
        B, _, L, _ = q.shape
        c = self.chunk_size if 0 < self.chunk_size < L else L
        full = L // c * c
        # SDPA directly: kernels.attention wants equal q/k and v widths, Mega's v (2D) is wider than z.
        # Chunks become the head axis; a shorter last chunk is attended separately (no padding mask needed).
        parts = []
        if full:
            split = [t[:, 0, :full].unflatten(1, (full // c, c)) for t in (q, k, v)]  # (B, L/c, c, .)
            parts.append(F.scaled_dot_product_attention(*split, is_causal=not self.bidirectional).flatten(1, 2))
        if full < L:
            tail = [t[:, 0, full:] for t in (q, k, v)]  # (B, L - full, .)
            parts.append(F.scaled_dot_product_attention(*tail, is_causal=not self.bidirectional))
        return torch.cat(parts, dim=1)  # (B, L, v)

    def _output(self, x: torch.Tensor, o: torch.Tensor, reset: torch.Tensor, update: torch.Tensor,
                hx: torch.Tensor) -> torch.Tensor:
        h = F.silu(hx + self.out_proj(reset * o))  # candidate H^
        return update * (h - x)  # the Block adds X: Y = X + phi (H^ - X)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, L, D) -> (output (B, L, D), keys (B, 1, L, z), values (B, 1, L, v))."""
        mx = F.silu(self.ema(x.transpose(1, 2)).transpose(1, 2))  # (B, L, D)
        q, k, v, reset, update, hx = self._gates(x, mx, torch.arange(x.shape[1], device=x.device))
        return self._output(x, self._attend(q, k, v), reset, update, hx), k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        return self._run(x)[0]

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """EMA state (B, D, h) plus keys/values of the current chunk (B, c, z/v), c = chunk_size or max_len."""
        if self.bidirectional:
            raise RuntimeError("a bidirectional Mega layer reads the future and cannot be stepped; use forward()")
        weight = self.v_proj.weight
        kwargs = {"device": device or weight.device, "dtype": dtype or weight.dtype}
        c = min(self.chunk_size or max_len, max_len)
        return {"ema": self.ema.allocate_state(batch_size, kwargs["device"]), "pos": 0, "max_len": max_len,
                "k": torch.zeros(batch_size, c, self.z_dim, **kwargs),
                "v": torch.zeros(batch_size, c, self.v_dim, **kwargs)}

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D): one EMA step, then attention over the current chunk's cached keys."""
        pos = state["pos"]
        if pos >= state["max_len"]:
            raise RuntimeError(f"Mega state is full ({pos} positions); allocate_state with a larger max_len")
        y, state["ema"] = self.ema.step(x_t, state["ema"])
        mx = F.silu(y).unsqueeze(1)  # (B, 1, D)
        q, k, v, reset, update, hx = self._gates(x_t.unsqueeze(1), mx, torch.tensor([pos], device=x_t.device))
        j = pos % self.chunk_size if self.chunk_size else pos  # slot within the chunk; 0 starts a new chunk
        state["k"][:, j], state["v"][:, j] = k[:, 0, 0], v[:, 0, 0]
        state["pos"] = pos + 1
        o = F.scaled_dot_product_attention(q[:, 0], state["k"][:, : j + 1], state["v"][:, : j + 1])  # (B, 1, v)
        return self._output(x_t.unsqueeze(1), o, reset, update, hx)[:, 0]

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), leaving `state` as if `step` had read the L positions (from an empty state)."""
        L = x.shape[1]
        if state["pos"] != 0 or L > state["max_len"]:
            raise RuntimeError(f"prefill needs an empty Mega state of at least {L} positions, got pos {state['pos']}")
        y, k, v = self._run(x)
        p, q, _ = self.ema.coefficients()  # each (1, D, h)
        ages = torch.arange(L - 1, -1, -1, device=x.device, dtype=q.dtype)  # (L,) steps since input s
        decay = torch.exp(torch.log(q[0]).unsqueeze(-1) * ages)  # (D, h, L)
        state["ema"] = torch.einsum("bld,dh,dhl->bdh", x.to(q.dtype), p[0], decay)  # sum_s q^(L-1-s) a b x_s
        start = (L - 1) // self.chunk_size * self.chunk_size if self.chunk_size else 0  # the current chunk
        state["k"][:, : L - start], state["v"][:, : L - start] = k[:, 0, start:], v[:, 0, start:]
        state["pos"] = L
        return y
