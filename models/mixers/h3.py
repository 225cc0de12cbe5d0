"""H3: Hungry Hungry Hippos (Fu et al. 2023), the SSM layer that recalls and compares tokens.

    q, k, v = W_q x, W_k x, W_v x                   (column projections)
    k       = ShiftSSM(k)                            remember the last few keys
    kv      = k ⊙ v   (per head: outer product k vᵀ)  bind keys to values
    y       = q ⊙ DiagonalSSM(kv)                    read the long memory with the query
    out     = W_o y                                  (row projection)

Like linear attention with a shift and a decay: the diagonal SSM accumulates kv over the whole
past, the query reads it out. With head_dim d > 1 each head keeps a d x d memory; channel layouts
follow the reference code (HazyResearch/H3, ``src/models/ssm/h3.py``): input channel c = h*d + i,
output channel c = j*H + h.
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid_pretrain.kernels.ssm_memory import ssm_memory
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.ssm import DiagonalSSM, ShiftSSM
from hybrid_pretrain.models.roles import (
    channel_major_inputs,
    channel_major_output,
    column_linear,
    local_size,
    mark_sharded,
    row_linear,
)


class H3(nn.Module):
    """H3 mixer: ``forward(x (B, L, D)) -> (B, L, D)``; recurrent ``allocate_state``/``step``.

    Under tensor parallelism each rank holds ``H / TP`` whole heads: its slice of the q/k/v channels
    (column projections) and those channels' shift and diagonal SSMs; ``n_heads`` and ``d_model`` below
    are this rank's share. Its outputs ``j * H_local + h`` are ``head_dim`` strided chunks of the full
    layout, which the row projection reads with that stride.
    """

    supports_tensor_parallel = True

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.h3_head_dim
        self.n_heads = local_size(cfg.d_model // cfg.h3_head_dim, "H3 heads (model.d_model / model.h3_head_dim)")
        self.d_model = self.n_heads * self.head_dim  # this rank's channels
        self.q_proj = column_linear(cfg.d_model, cfg.d_model)
        self.k_proj = column_linear(cfg.d_model, cfg.d_model)
        self.v_proj = column_linear(cfg.d_model, cfg.d_model)
        self.shift_ssm = mark_sharded(ShiftSSM(self.d_model, cfg.h3_d_state))
        self.diag_ssm = mark_sharded(DiagonalSSM(self.n_heads, cfg.h3_d_state))
        self.out_proj = row_linear(cfg.d_model, cfg.d_model, stride=self.head_dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """(B, D, ...) -> (B, d, H, ...): channel h*d + i goes to [i, h]."""
        B, _, *rest = t.shape
        return t.reshape(B, self.n_heads, self.head_dim, *rest).transpose(1, 2)  # (B, d, H, ...)

    def _mix(self, x: torch.Tensor, need_kv: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, L, D) -> (y (B, D, L) before the output projection, k before the shift (B, D, L), kv).

        kv is what the diagonal SSM reads: (B, H, L) with one channel per head, (B, d_i, d_j, H, L) otherwise;
        with head_dim > 1 it is formed only when ``need_kv`` (prefill builds the state from it), else None:
        ``kernels.ssm_memory`` picks how to read the memories out, not always through kv.
        """
        d, H = self.head_dim, self.n_heads
        projections = [self.q_proj, self.k_proj, self.v_proj]
        # channel-major, so every op below reads matching layouts (kernels/channel_major.py says why)
        q, k_in, v = channel_major_inputs(x, projections)  # (B, D, L) each
        B, _, L = q.shape  # the projections' length: all positions, also when x holds a sequence-parallel slice
        k = self.shift_ssm(k_in)  # (B, D, L)
        if d == 1:  # one channel per head (the paper's models): binding and readout are elementwise
            kv = k * v  # (B, H, L)
            y = self.diag_ssm(kv) * q  # (B, H, L)
        else:
            ssm, heads = self.diag_ssm, (B, H, d, L)  # channel h * d + i: a view of (B, D, L)
            kernel_of = None if torch.is_grad_enabled() else ssm.kernel  # kept by the SSM while autograd is off
            y = ssm_memory(q.view(heads), k.view(heads), v.view(heads), *ssm.discretized(), ssm.D,
                           kernel_of)  # (B, H, d_j, L)
            y = y.transpose(1, 2)  # (B, d_j, H, L): the output projection reads channel j * H + h
            kv = self._split(k).unsqueeze(2) * self._split(v).unsqueeze(1) if need_kv else None  # (B, d_i, d_j, H, L)
        return y.reshape(B, self.d_model, L), k_in, kv  # (B, D, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        return channel_major_output(self._mix(x)[0], self.out_proj)

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """Recurrent state, constant in sequence length (`max_len` is accepted for a uniform interface).

        shift: (B, D, N) last N keys; diag: (B, d, d, H, N/2) complex memory of kv (``DiagonalSSM`` keeps it
        scaled by its output matrix).
        """
        device = device or self.q_proj.weight.device
        d = self.head_dim
        return {
            "shift": self.shift_ssm.allocate_state(batch_size, device=device, dtype=dtype),
            "diag": self.diag_ssm.allocate_state((batch_size, d, d), device=device),
        }

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> y_t: (B, D); replaces the entries of `state` with the next state."""
        B, d = x_t.shape[0], self.head_dim
        q, k, v = self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t)  # (B, D)
        k, state["shift"] = self.shift_ssm.step(k, state["shift"])
        if d == 1:
            y, diag = self.diag_ssm.step(k * v, state["diag"].view(B, -1, self.diag_ssm.n_modes))  # (B, H)
            state["diag"] = diag.view_as(state["diag"])
            return self.out_proj(y * q)
        kv = self._split(k).unsqueeze(2) * self._split(v).unsqueeze(1)  # (B, d_i, d_j, H)
        y, state["diag"] = self.diag_ssm.step(kv, state["diag"])  # (B, d_i, d_j, H)
        y = (y * self._split(q).unsqueeze(2)).sum(1)  # (B, d_j, H)
        return self.out_proj(y.reshape(B, self.d_model))

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), leaving `state` as if `step` had read the L positions from a zero state.

        One forward pass instead of L recurrent steps: the shift state is the last N keys, the diagonal
        state the decayed sum of every kv (``DiagonalSSM.state_after``, one chunked matmul pass).
        """
        B = x.shape[0]
        d, H, N = self.head_dim, self.n_heads, self.shift_ssm.d_state
        y, k_in, kv = self._mix(x, need_kv=True)  # (B, D, L)
        shift = nn.functional.pad(k_in, (N, 0))[..., -N:].flip(-1)  # (B, D, N): k_{L-1}, k_{L-2}, ..., zeros
        state["shift"] = shift.to(state["shift"].dtype)
        state["diag"] = self.diag_ssm.state_after(kv).view(B, d, d, H, -1)  # (B, d_i, d_j, H, N/2)
        return channel_major_output(y, self.out_proj)
