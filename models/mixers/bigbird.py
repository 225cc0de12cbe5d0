"""BigBird attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences").

Block-sparse attention: the sequence is cut into blocks of `block` tokens and query block I sees

    window  key blocks I-window .. I                      (sliding window, local context)
    global  key blocks 0 .. num_global-1, and the first num_global query blocks see every block
    random  num_random further key blocks, drawn once per layer from a seeded generator

For the causal LM use everything is also causally masked: future blocks are never chosen (random
blocks are drawn among the earlier blocks outside window and global, so each row keeps its budget),
and within the diagonal block keys after the query are masked token by token. The mask is a function
of (seed, layer index, block index) only, so training, evaluation and decoding at any length agree.
Each query block sees at most window + 1 + num_global + num_random key blocks, so cost is linear in L;
it runs through kernels.attention's block_mask path (Triton skips the masked tiles on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.kernels.attention import attention
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.mixers.attention import Attention
from hybrid_pretrain.models.options import layer_options


@dataclass
class BigBirdOptions:
    """``model.options.bigbird``."""

    block: int = 16  # tokens per block; a power of two >= 16 (the Triton tile)
    window: int = 1  # earlier key blocks in the sliding window (plus the query's own block)
    num_global: int = 1  # leading blocks that see and are seen by every block
    num_random: int = 1  # random earlier key blocks per query block
    seed: int = 0  # random blocks of layer i come from seed + i

    def validate(self, name: str) -> None:
        if self.block < 16 or self.block & (self.block - 1):
            raise ConfigError(f"model.options.{name}.block must be a power of two >= 16, got {self.block}")
        for key in ("window", "num_global", "num_random"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.options.{name}.{key} must be >= 0, got {getattr(self, key)}")


def bigbird_block_mask(num_blocks: int, window: int, num_global: int, num_random: int, seed: int) -> torch.Tensor:
    """Causal BigBird block mask (1, num_blocks, num_blocks) bool: [0, I, J] True = query block I sees key block J.

    Row I depends only on (I, seed), so the mask for a shorter sequence is the top-left corner of this one.
    """
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device="cpu")
    for i in range(num_blocks):
        mask[i, max(0, i - window) : i + 1] = True
        mask[i, : min(num_global, i + 1)] = True
        if i < num_global:
            mask[i, : i + 1] = True
    for i in range(num_blocks):
        # A generator per row keeps row I identical whatever num_blocks is.
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i)
        free = (~mask[i, :i]).nonzero().flatten()  # earlier blocks outside window and global
        chosen = free[torch.randperm(len(free), generator=gen, device="cpu")[:num_random]]
        mask[i, chosen] = True
    return mask.unsqueeze(0)


class BigBird(Attention):
    """Causal block-sparse self-attention: ``forward(x (B, L, D)) -> (B, L, D)``; decoding with a KV cache.

    Projections, rotary embeddings and the KV cache layout are those of `Attention`; only the mask differs.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.opts = layer_options(cfg, "bigbird", BigBirdOptions)
        o = self.opts
        num_blocks = -(-cfg.max_seq_len // o.block)
        # A plain attribute, not a buffer: it is a pure function of the options, so it never needs saving,
        # and building on the meta device (then to_empty) cannot leave it uninitialised.
        self._mask = bigbird_block_mask(num_blocks, o.window, o.num_global, o.num_random, o.seed + layer_idx)
        self._mask_on: dict[torch.device, torch.Tensor] = {}

    def block_mask(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, ceil(length/block), ceil(length/block)) bool on `device`."""
        n = -(-length // self.opts.block)
        if n > self._mask.shape[-1]:
            raise RuntimeError(f"bigbird: sequence of {length} tokens exceeds model.max_seq_len")
        if device not in self._mask_on:
            self._mask_on[device] = self._mask.to(device)
        return self._mask_on[device][:, :n, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        B, L, _ = x.shape
        q, k, v = self._qkv(x, torch.arange(L, device=x.device))  # each (B, H, L, hd)
        y = attention(q, k, v, causal=True, block_mask=self.block_mask(L, x.device), block=self.opts.block)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)

    def _step_mask(self, pos: int, device: torch.device) -> torch.Tensor:
        """(1, 1, 1, pos + 1) bool: which cached keys the query at `pos` sees (its row of the block mask)."""
        row = self.block_mask(pos + 1, device)[0, pos // self.opts.block]  # (n,)
        return row.repeat_interleave(self.opts.block)[: pos + 1].view(1, 1, 1, -1)

    def prefill(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x: (B, L, D) -> forward(x), writing the L positions' keys and values into an empty KV cache."""
        B, L, _ = x.shape
        if state["pos"] != 0 or L > state["k"].shape[2]:
            raise RuntimeError(f"bigbird prefill needs an empty KV cache of at least {L} positions")
        q, k, v = self._qkv(x, torch.arange(L, device=x.device))  # each (B, H, L, hd)
        state["k"][:, :, :L], state["v"][:, :, :L], state["pos"] = k, v, L
        y = attention(q, k, v, causal=True, block_mask=self.block_mask(L, x.device), block=self.opts.block)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)
