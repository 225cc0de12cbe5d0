"""Linear Transformer attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    y_i = phi(q_i)ᵀ S_i / (phi(q_i)ᵀ z_i),   S_i = sum_{j<=i} phi(k_j) v_jᵀ,   z_i = sum_{j<=i} phi(k_j)

with the feature map phi(x) = elu(x) + 1 (positive, so the normaliser never vanishes). Decoding keeps
only (S, z): (H, d, d) + (H, d) per sequence, so a generated token costs the same at any context length.
With ``rotary_dim > 0`` position enters as in RoFormer (Su et al. 2021, eq. 19): the numerator uses rotated
features R_i phi(q_i), R_j phi(k_j) (so it depends on i - j only), the denominator the unrotated ones.

Training uses the chunkwise form of the prefix sums: the sequence is cut into chunks of C tokens;
inside a chunk the causal sum is a masked (C, C) product (quadratic, but only in C), and across
chunks S and z are an exclusive cumulative sum of per-chunk totals. This is O(L C d + L d²) time and
O(L/C · d²) memory, where materialising every S_i (the naive cumsum) would need O(L d²) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.attention import apply_rotary
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.roles import column_linear, row_linear

EPS = 1e-6  # keeps the normaliser away from 0 when every phi(k) underflows


@dataclass
class LinearAttentionOptions:
    """``model.options.linear_attention``."""

    chunk_size: int = 64  # tokens per chunk of the chunkwise prefix sum (memory vs. parallelism)

    def validate(self, name: str) -> None:
        if self.chunk_size <= 0:
            raise ConfigError(f"model.options.{name}.chunk_size must be a positive integer, got {self.chunk_size}")


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, the paper's kernel feature map."""
    return F.elu(x) + 1.0


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    q_rot: torch.Tensor | None = None,
    k_rot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal linear attention by chunkwise prefix sums, in fp32.

    q, k: (B, H, L, d) already feature-mapped (positive); v: (B, H, L, dv) -> (B, H, L, dv).
    q_rot, k_rot: (B, H, L, d) rotated features for the numerator (None: q, k themselves).
    """
    B, H, L, d = q.shape
    C = min(chunk_size, L)
    n = -(-L // C)
    pad = n * C - L
    rotated = q_rot is not None
    parts = (q, k, v, q_rot, k_rot) if rotated else (q, k, v)
    # Zero-padded keys add nothing to S or z.
    parts = [F.pad(t.float(), (0, 0, 0, pad)).view(B, H, n, C, t.shape[-1]) for t in parts]  # (B, H, n, C, d)
    q, k, v = parts[:3]
    q_num, k_num = parts[3:] if rotated else (q, k)
    # Across chunks: S and z accumulated over all earlier chunks (exclusive cumulative sum).
    kv = torch.einsum("bhncd,bhnce->bhnde", k_num, v)  # (B, H, n, d, dv) per-chunk totals
    S = torch.cumsum(kv, dim=2) - kv  # (B, H, n, d, dv)
    z = torch.cumsum(k.sum(dim=3), dim=2) - k.sum(dim=3)  # (B, H, n, d)
    # Inside a chunk: the causal part as a masked (C, C) score matrix.
    scores = torch.einsum("bhncd,bhnjd->bhncj", q, k).tril()  # (B, H, n, C, C)
    scores_num = torch.einsum("bhncd,bhnjd->bhncj", q_num, k_num).tril() if rotated else scores
    num = torch.einsum("bhncj,bhnje->bhnce", scores_num, v) + torch.einsum("bhncd,bhnde->bhnce", q_num, S)
    den = scores.sum(dim=-1) + torch.einsum("bhncd,bhnd->bhnc", q, z)  # (B, H, n, C)
    y = num / (den.unsqueeze(-1) + EPS)  # (B, H, n, C, dv)
    return y.reshape(B, H, n * C, -1)[:, :, :L]


class LinearAttention(nn.Module):
    """Causal linear attention: ``forward(x (B, L, D)) -> (B, L, D)``; RNN decoding with a constant-size state."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.opts = layer_options(cfg, "linear_attention", LinearAttentionOptions)
        self.d_model, self.n_heads = cfg.d_model, cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rotary_dim = cfg.rotary_dim
        self.qkv_proj = column_linear(self.d_model, 3 * self.d_model)
        self.out_proj = row_linear(self.d_model, self.d_model)

    def _qkv(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, ...]:
        """x: (B, L, D) at positions start.. -> phi(q), phi(k), v, and the rotated R phi(q), R phi(k) (or None).

        Each (B, H, L, hd).
        """
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).view(B, L, -1, 3, self.head_dim)  # (B, L, H, 3, hd), head-major as Attention
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, H, L, hd)
        q, k = feature_map(q), feature_map(k)
        if not self.rotary_dim:
            return q, k, v, None, None
        positions = torch.arange(start, start + L, device=x.device)
        return q, k, v, apply_rotary(q, positions, self.rotary_dim), apply_rotary(k, positions, self.rotary_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        B, L, _ = x.shape
        q, k, v, q_rot, k_rot = self._qkv(x)
        y = causal_linear_attention(q, k, v, self.opts.chunk_size, q_rot, k_rot).to(x.dtype)  # (B, H, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """S (B, H, hd, hd), z (B, H, hd) in fp32 and the position: the same size whatever `max_len`."""
        device = device or self.qkv_proj.weight.device
        heads = self.qkv_proj.weight.shape[0] // (3 * self.head_dim)  # local heads under tensor parallelism
        return {
            "S": torch.zeros(batch_size, heads, self.head_dim, self.head_dim, device=device),
            "z": torch.zeros(batch_size, heads, self.head_dim, device=device),
            "pos": 0,  # only rotary embeddings need it
        }

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D); adds this token's phi(k) vᵀ and phi(k) to the state."""
        q, k, v, q_rot, k_rot = self._qkv(x_t.unsqueeze(1), state["pos"])
        q, k, v = q[:, :, 0].float(), k[:, :, 0].float(), v[:, :, 0].float()  # each (B, H, hd)
        q_num, k_num = (q, k) if q_rot is None else (q_rot[:, :, 0].float(), k_rot[:, :, 0].float())
        state["S"] = state["S"] + k_num.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, hd, hd)
        state["z"] = state["z"] + k
        state["pos"] += 1
        num = torch.einsum("bhd,bhde->bhe", q_num, state["S"])
        den = torch.einsum("bhd,bhd->bh", q, state["z"]).unsqueeze(-1) + EPS
        y = (num / den).to(x_t.dtype)  # (B, H, hd)
        return self.out_proj(y.reshape(x_t.shape[0], -1))

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), leaving `state` as if `step` had read the L positions (from a zero state)."""
        if state["pos"] != 0:
            raise RuntimeError(f"linear_attention prefill needs a fresh state, got one at position {state['pos']}")
        _, k, v, _, k_rot = self._qkv(x)
        k_num = k if k_rot is None else k_rot
        state["S"] = state["S"] + torch.einsum("bhld,bhle->bhde", k_num.float(), v.float())
        state["z"] = state["z"] + k.float().sum(dim=2)
        state["pos"] = x.shape[1]
        return self.forward(x)
