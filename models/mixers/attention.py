"""Causal multi-head self-attention (Vaswani et al. 2017), optionally with rotary embeddings (Su et al. 2021).

H3 layers carry position, so hybrid models usually run attention without positional encoding
(``rotary_dim = 0``); ``rotary_dim > 0`` rotates the first ``rotary_dim`` dims of each head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.kernels.attention import attention
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.roles import column_linear, local_size, row_linear

ROTARY_BASE = 10000.0


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate pairs (i, i + rotary_dim/2) of the first `rotary_dim` dims by angle pos * base^(-2i/rotary_dim).

    x: (B, H, L, hd); positions: (L,) -> (B, H, L, hd). Computed in fp32 so long positions keep precision.
    """
    half = rotary_dim // 2
    inv_freq = ROTARY_BASE ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (hd_r/2,)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (L, hd_r/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2, rest = x[..., :half].float(), x[..., half:rotary_dim].float(), x[..., rotary_dim:]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)


class Attention(nn.Module):
    """Causal self-attention: ``forward(x (B, L, D)) -> (B, L, D)``; recurrent decoding with a KV cache.

    Under tensor parallelism each rank holds ``n_heads / TP`` whole heads (``n_heads`` and ``d_model``
    below are this rank's share); the output projection sums the ranks' contributions.
    """

    supports_tensor_parallel = True

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.d_model // cfg.n_heads
        self.n_heads = local_size(cfg.n_heads, "model.n_heads")
        self.d_model = self.n_heads * self.head_dim  # this rank's attention width
        self.rotary_dim = cfg.rotary_dim
        self.dropout = cfg.dropout
        self.qkv_proj = column_linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = row_linear(cfg.d_model, cfg.d_model)

    def _qkv(
        self, x: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, L, D) -> q, k, v each (B, H, L, hd), rotary applied to q and k (positions: 0..L-1 if None).

        L is the projection's: under sequence parallelism x holds this rank's positions and the column
        projection returns all of them.
        """
        qkv = self.qkv_proj(x)  # (B, L, 3 D)
        B, L, _ = qkv.shape
        # Head-major layout (H, 3, hd) so a column split of the fused projection keeps whole heads per rank.
        qkv = qkv.view(B, L, -1, 3, self.head_dim)  # (B, L, H, 3, hd)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, H, L, hd)
        if positions is None:
            positions = torch.arange(L, device=x.device)
        if self.rotary_dim:
            q, k = apply_rotary(q, positions, self.rotary_dim), apply_rotary(k, positions, self.rotary_dim)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        q, k, v = self._qkv(x)
        B, _, L, _ = q.shape
        y = attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)  # (B, H, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, self.d_model))  # (B, L, D)

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """KV cache: k, v (B, H, max_len, hd) and the number of positions filled so far."""
        weight = self.qkv_proj.weight
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        kwargs = {"device": device or weight.device, "dtype": dtype or weight.dtype}
        return {"k": torch.zeros(shape, **kwargs), "v": torch.zeros(shape, **kwargs), "pos": 0}

    def _step_mask(self, pos: int, device: torch.device) -> torch.Tensor | None:
        """Which cached keys 0..pos the query at `pos` sees, (1, 1, 1, pos + 1) bool; None: all of them (causal)."""
        return None

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> y_t: (B, D); writes this position's k, v into the cache and advances `pos`."""
        pos = state["pos"]
        if pos >= state["k"].shape[2]:
            raise RuntimeError(f"attention KV cache is full ({pos} positions); allocate_state with a larger max_len")
        q, k, v = self._qkv(x_t.unsqueeze(1), torch.tensor([pos], device=x_t.device))  # each (B, H, 1, hd)
        state["k"][:, :, pos : pos + 1] = k
        state["v"][:, :, pos : pos + 1] = v
        state["pos"] = pos + 1
        y = F.scaled_dot_product_attention(q, state["k"][:, :, : pos + 1], state["v"][:, :, : pos + 1],
                                           attn_mask=self._step_mask(pos, x_t.device))
        return self.out_proj(y.reshape(x_t.shape[0], self.d_model))  # (B, D)

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), writing the L positions' keys and values into an empty KV cache."""
        B, L, _ = x.shape
        if state["pos"] != 0 or L > state["k"].shape[2]:
            raise RuntimeError(
                f"prefill needs an empty KV cache of at least {L} positions, got pos {state['pos']} "
                f"of {state['k'].shape[2]}"
            )
        q, k, v = self._qkv(x, torch.arange(L, device=x.device))  # each (B, H, L, hd)
        state["k"][:, :, :L] = k
        state["v"][:, :, :L] = v
        state["pos"] = L
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, self.d_model))  # (B, L, D)
