"""Block-Recurrent Transformer layer (Hutchins et al. 2022, "Block-Recurrent Transformers").

The sequence is read in blocks of W tokens; S state vectors carry a summary from block to block.

    vertical (tokens, output)   token queries attend to the tokens of this and the previous block
                                (causal) and, cross, to the S state vectors; y = W_o [self; cross]
    horizontal (state update)   state queries attend to the states and, cross, to this block's
                                tokens; h = W_s [self; cross];  c <- gate(c, h);  c <- gate(c, MLP(c))

Keys and values are shared between directions (token k/v serve token self-attention and the states'
cross-attention; state k/v serve state self-attention and the tokens' cross-attention), as in the paper.
The gate is the paper's LSTM-style gate  c' = c * sigmoid(W_f h + b_f + 1) + (W_z h + b_z) * sigmoid(W_i h + b_i - 1)
or its "fixed" gate  c' = c * g + (W_z h + b_z) * (1 - g),  g = sigmoid(b_g) learned per channel.

Tokens of block n read the state left by blocks < n, so the layer is causal; token self-attention for
all blocks runs in one call of kernels.attention (a banded block mask), only the state recurrence loops
over blocks. Decoding (`step`) keeps the two-block KV window and the state: the state changes only when
a block is complete, so a token step is exact, not an approximation (`prefill` builds the same from a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.kernels.attention import attention
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.attention import apply_rotary
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.models.roles import column_linear, replicated_linear, row_linear

GATES = ("lstm", "fixed")


@dataclass
class BlockRecurrentOptions:
    """``model.options.block_recurrent``."""

    block_len: int = 32  # W: tokens per block (and the token self-attention window); power of two >= 16
    num_states: int = 32  # S: state vectors
    gate: str = "lstm"  # "lstm" or "fixed"

    def validate(self, name: str) -> None:
        if self.block_len < 16 or self.block_len & (self.block_len - 1):
            raise ConfigError(f"model.options.{name}.block_len must be a power of two >= 16, got {self.block_len}")
        if self.num_states <= 0:
            raise ConfigError(f"model.options.{name}.num_states must be a positive integer, got {self.num_states}")
        if self.gate not in GATES:
            raise ConfigError(f"model.options.{name}.gate must be one of {', '.join(GATES)}, got '{self.gate}'")


class Gate(nn.Module):
    """Blends the state c with a candidate computed from h; both coefficients lie in (0, 1)."""

    def __init__(self, d: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.z_proj = replicated_linear(d, d)
        if kind == "lstm":
            self.i_proj, self.f_proj = replicated_linear(d, d), replicated_linear(d, d)
        else:
            self.bias = nn.Parameter(torch.zeros(d))

    def reset_parameters(self) -> None:
        if self.kind == "fixed":
            nn.init.zeros_(self.bias)  # g = 0.5 at start

    def coefficients(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (..., d) -> (forget, input) each broadcastable to (..., d), in (0, 1)."""
        if self.kind == "lstm":
            # The +1 / -1 offsets start the gate remembering more than it writes (paper, section 3.2).
            return torch.sigmoid(self.f_proj(h) + 1.0), torch.sigmoid(self.i_proj(h) - 1.0)
        g = torch.sigmoid(self.bias)
        return g, 1.0 - g

    def forward(self, c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """c, h: (..., d) -> the next c: (..., d)."""
        forget, write = self.coefficients(h)
        return c * forget + self.z_proj(h) * write


class BlockRecurrent(nn.Module):
    """Block-recurrent cell as a mixer: ``forward(x (B, L, D)) -> (B, L, D)``; exact token ``step``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.opts = layer_options(cfg, "block_recurrent", BlockRecurrentOptions)
        self.d_model, self.n_heads = cfg.d_model, cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rotary_dim = cfg.rotary_dim
        D, S = cfg.d_model, self.opts.num_states
        self.token_proj = column_linear(D, 4 * D)  # q_self, q_cross, k, v of the tokens
        self.out_proj = row_linear(2 * D, D)  # [self; cross] -> residual stream (the Block adds it)
        self.init_std = cfg.init_std
        self.state_init = nn.Parameter(torch.empty(S, D))  # c_0, learned
        self.state_ids = nn.Parameter(torch.empty(S, D))  # tell the states apart, the paper's "state IDs"
        self.state_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.state_proj = column_linear(D, 4 * D)  # q_self, q_cross, k, v of the states
        self.state_out = row_linear(2 * D, D)
        self.attn_gate = Gate(D, self.opts.gate)
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mlp_up, self.mlp_down = column_linear(D, cfg.ffn_dim), row_linear(cfg.ffn_dim, D)
        self.mlp_gate = Gate(D, self.opts.gate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initial state and state IDs ~ N(0, init_std); the projections initialise themselves."""
        nn.init.normal_(self.state_init, std=self.init_std)
        nn.init.normal_(self.state_ids, std=self.init_std)

    def _heads(self, t: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(..., L, parts * D) -> `parts` tensors (..., H, L, hd), head-major so a column split keeps heads."""
        *lead, L, _ = t.shape
        t = t.view(*lead, L, -1, parts, self.head_dim)  # (..., L, H, parts, hd)
        return t.movedim(-2, 0).transpose(-3, -2).unbind(0)  # each (..., H, L, hd)

    def _state_kv(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c: (B, S, D) -> the states' q_self, q_cross, k, v each (B, H, S, hd)."""
        return self._heads(self.state_proj(self.state_norm(c + self.state_ids)), 4)

    def _update(self, c: torch.Tensor, state_qkv: tuple, k_blk: torch.Tensor, v_blk: torch.Tensor) -> torch.Tensor:
        """Horizontal direction: c (B, S, D) and a block's token k, v (B, H, W, hd) -> the next c (B, S, D)."""
        q_self, q_cross, k, v = state_qkv
        a_self = F.scaled_dot_product_attention(q_self, k, v)  # (B, H, S, hd), states see each other
        a_cross = F.scaled_dot_product_attention(q_cross, k_blk, v_blk)  # (B, H, S, hd), the whole block
        h = self.state_out(torch.cat([a_self, a_cross], dim=-1).transpose(1, 2).flatten(2))  # (B, S, D)
        c = self.attn_gate(c, h)
        return self.mlp_gate(c, self.mlp_down(F.gelu(self.mlp_up(self.mlp_norm(c)), approximate="tanh")))

    def _tokens(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (B, L, D) -> token q_self, q_cross, k, v each (B, H, L, hd); rotary on q_self and k."""
        q_self, q_cross, k, v = self._heads(self.token_proj(x), 4)
        if self.rotary_dim:
            q_self, k = apply_rotary(q_self, positions, self.rotary_dim), apply_rotary(k, positions, self.rotary_dim)
        return q_self, q_cross, k, v

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """c_0: (B, S, D)."""
        return self.state_init.unsqueeze(0).expand(batch_size, -1, -1)

    def scan(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, L, D), optional start state c (B, S, D) -> (y (B, L, D), the state after the last full block)."""
        B, L, _ = x.shape
        W = self.opts.block_len
        n = -(-L // W)
        # Padding the tail to whole blocks changes nothing before it (every mask is causal).
        x = F.pad(x, (0, 0, 0, n * W - L))  # (B, nW, D)
        q_self, q_cross, k, v = self._tokens(x, torch.arange(n * W, device=x.device))  # each (B, H, nW, hd)
        # Token self-attention, all blocks at once: query block I sees key blocks I-1 and I, causally.
        band = torch.ones(n, n, dtype=torch.bool, device=x.device)
        band = (band.tril() & ~band.tril(-2)).unsqueeze(0)  # (1, n, n)
        a_self = attention(q_self, k, v, causal=True, block_mask=band, block=W)  # (B, H, nW, hd)
        # The state recurrence: block i's tokens read the state left by blocks < i.
        c = self.initial_state(B) if c is None else c
        k_blk, v_blk = k.unflatten(2, (n, W)), v.unflatten(2, (n, W))  # (B, H, n, W, hd)
        state_k, state_v, full = [], [], L // W
        for i in range(n):
            qkv = self._state_kv(c)
            state_k.append(qkv[2])
            state_v.append(qkv[3])
            if i < full:  # a partial last block never updates the state (step waits for W tokens too)
                c = self._update(c, qkv, k_blk[:, :, i], v_blk[:, :, i])
        sk, sv = torch.stack(state_k, dim=2), torch.stack(state_v, dim=2)  # (B, H, n, S, hd)
        a_cross = F.scaled_dot_product_attention(q_cross.unflatten(2, (n, W)), sk, sv)  # (B, H, n, W, hd)
        a = torch.cat([a_self, a_cross.flatten(2, 3)], dim=-1)  # (B, H, nW, 2hd)
        y = self.out_proj(a.transpose(1, 2).flatten(2))[:, :L]  # (B, L, D)
        return y, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D), starting from the learned initial state."""
        return self.scan(x)[0]

    def allocate_state(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict:
        """State vectors c (B, S, D) and a two-block KV window; constant in `max_len` (kept for the interface)."""
        device = device or self.token_proj.weight.device
        dtype = dtype or self.token_proj.weight.dtype
        heads = self.token_proj.weight.shape[0] // (4 * self.head_dim)
        kv = (batch_size, heads, 2 * self.opts.block_len, self.head_dim)
        c = self.initial_state(batch_size).to(device=device, dtype=dtype)
        zeros = {"device": device, "dtype": dtype}
        return {"c": c, "k": torch.zeros(kv, **zeros), "v": torch.zeros(kv, **zeros), "pos": 0}

    def step(self, x_t: torch.Tensor, state: dict) -> torch.Tensor:
        """x_t: (B, D) -> (B, D). Slots 0..W-1 of the window hold the previous block, W..2W-1 the current one."""
        W, pos = self.opts.block_len, state["pos"]
        i = pos % W
        q_self, q_cross, k, v = self._tokens(x_t.unsqueeze(1), torch.tensor([pos], device=x_t.device))  # (B, H, 1, hd)
        state["k"][:, :, W + i], state["v"][:, :, W + i] = k[:, :, 0], v[:, :, 0]
        first = W if pos < W else 0  # the first block has no previous block
        a_self = F.scaled_dot_product_attention(q_self, state["k"][:, :, first : W + i + 1],
                                                state["v"][:, :, first : W + i + 1])  # (B, H, 1, hd)
        qkv = self._state_kv(state["c"])
        a_cross = F.scaled_dot_product_attention(q_cross, qkv[2], qkv[3])  # (B, H, 1, hd)
        y = self.out_proj(torch.cat([a_self, a_cross], dim=-1).flatten(1))  # (B, D)
        if i == W - 1:  # block complete: update the state, slide the window
            state["c"] = self._update(state["c"], qkv, state["k"][:, :, W:], state["v"][:, :, W:])
            state["k"] = torch.cat([state["k"][:, :, W:], torch.zeros_like(state["k"][:, :, W:])], dim=2)
            state["v"] = torch.cat([state["v"][:, :, W:], torch.zeros_like(state["v"][:, :, W:])], dim=2)
        state["pos"] = pos + 1
        return y

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), leaving `state` as if `step` had read the L positions (from a fresh state)."""
        if state["pos"] != 0:
            raise RuntimeError(f"block_recurrent prefill needs a fresh state, got one at position {state['pos']}")
        B, L, _ = x.shape
        W = self.opts.block_len
        y, state["c"] = self.scan(x)
        full, i = divmod(L, W)
        start = max(0, (full - 1) * W)  # the last complete block (if any) and the partial one after it
        _, _, k, v = self._tokens(x[:, start:], torch.arange(start, L, device=x.device))  # each (B, H, L-start, hd)
        n = L - start
        state["k"].zero_()
        state["v"].zero_()
        state["k"][:, :, W + i - n : W + i], state["v"][:, :, W + i - n : W + i] = k, v
        state["pos"] = L
        return y
