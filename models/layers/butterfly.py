"""Pixelated Butterfly weights (Dao et al. 2022): a flat block-butterfly matrix plus a low-rank term.

A butterfly factor at level k connects block i to block i XOR 2^k. The product of all log2(n) factors
is a full butterfly; Pixelfly keeps its first-order ("flat") approximation, I + sum_k lambda B_k,
whose support is the union of the factors' supports: block (i, j) is non-zero iff i XOR j is 0 or a
power of two below 2^levels. Every such block is a free b x b weight (the identity and the lambdas are
absorbed into them), and a rank-r term U Vᵀ restores some global mixing:

    W = blocksparse(flat butterfly pattern) + U Vᵀ          y = x Wᵀ + bias

A rectangular matrix is a grid of square flat butterflies of n = min(in, out) / b blocks each (e.g.
the 3 of a fused q/k/v projection, or the 4 of a d -> 4d MLP), so every block row has the same number
of blocks and the product is one batched matmul. The pattern is fixed at construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_pretrain.base.errors import ConfigError


def level_offsets(n: int, levels: int = 0) -> list[int]:
    """XOR offsets of the flat butterfly on n blocks: 0 (the diagonal), then 2^k for k < levels (0: all)."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"butterfly needs a power-of-two number of blocks, got {n}")
    levels = min(levels or int(math.log2(n)), int(math.log2(n)))
    return [0] + [1 << k for k in range(levels)]


def flat_butterfly_pattern(out_blocks: int, in_blocks: int, levels: int = 0) -> torch.Tensor:
    """(out_blocks, in_blocks) bool block mask of ButterflyLinear's weight."""
    n = min(out_blocks, in_blocks)
    if max(out_blocks, in_blocks) % n:
        raise ValueError(f"butterfly needs block counts where one divides the other, got {out_blocks} x {in_blocks}")
    idx = torch.arange(n)
    square = torch.zeros(n, n, dtype=torch.bool)
    for offset in level_offsets(n, levels):
        square[idx, idx ^ offset] = True
    return square.repeat(out_blocks // n, in_blocks // n)


class ButterflyLinear(nn.Module):
    """``y = x (blocksparse + U Vᵀ)ᵀ + bias``: a drop-in for ``nn.Linear(in_features, out_features)``.

    ``blocks`` (R_out, R_in, n, K, b, b) holds, for each square tile (u, s) of the grid and each block row
    i, the K blocks at columns i XOR offset_k; only these are stored and multiplied. ``dense_weight()``
    materialises the (out, in) matrix and ``forward_dense`` is the reference the fast path is tested
    against. Replicated under tensor parallelism (no split of the block pattern is defined).
    """

    def __init__(self, in_features: int, out_features: int, block_size: int = 32, levels: int = 0, rank: int = 16,
                 bias: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        if in_features % block_size or out_features % block_size:
            raise ValueError(f"butterfly block_size {block_size} must divide in_features {in_features} "
                             f"and out_features {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.rank, self.init_std = block_size, rank, init_std
        n = min(in_features, out_features) // block_size
        if max(in_features, out_features) // block_size % n:
            raise ValueError(f"butterfly needs one of in_features {in_features}, out_features {out_features} to be "
                             "a multiple of the other")
        self.n = n
        self.offsets = level_offsets(n, levels)
        self.r_in, self.r_out = in_features // block_size // n, out_features // block_size // n
        K = len(self.offsets)
        self.blocks = nn.Parameter(torch.empty(self.r_out, self.r_in, n, K, block_size, block_size))
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.v = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    @property
    def density(self) -> float:
        """Fraction of the dense matrix's parameters this layer holds (blocks + low rank, no bias)."""
        return (self.blocks.numel() + self.u.numel() + self.v.numel()) / (self.in_features * self.out_features)

    def reset_parameters(self) -> None:
        """Blocks and U ~ N(0, init_std) as a dense projection would be; V ~ N(0, 1/in) so V x is O(1)."""
        with torch.no_grad():
            nn.init.normal_(self.blocks, std=self.init_std)
            nn.init.normal_(self.u, std=self.init_std)
            nn.init.normal_(self.v, std=1.0 / math.sqrt(self.in_features))
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, T, R_in, b) -> (n, T, R_in, K, b): entry k of block row i is input block i XOR offset_k.

        XOR with 2^k swaps neighbouring groups of 2^k blocks: a reshape and a flip, no index tensor.
        """
        n, T, R, b = x.shape
        perms = [x] + [x.reshape(n // (2 * o), 2, o, T, R, b).flip(1).reshape(n, T, R, b) for o in self.offsets[1:]]
        return torch.stack(perms, dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out), touching only the non-zero blocks."""
        lead, b, n = x.shape[:-1], self.block_size, self.n
        xb = x.reshape(-1, self.r_in, n, b).permute(2, 0, 1, 3)  # (n, T, R_in, b): block rows lead, for bmm
        xg = self._gather(xb).flatten(2)  # (n, T, R_in * K * b)
        w = self.blocks.permute(2, 1, 3, 5, 0, 4).reshape(n, xg.shape[-1], self.r_out * b)  # (n, R_in K b, R_out b)
        y = torch.bmm(xg, w)  # (n, T, R_out * b); explicit bmm: 2x faster than einsum's layout on CPU
        y = y.view(n, -1, self.r_out, b).permute(1, 2, 0, 3).reshape(*lead, self.out_features)  # (..., out)
        y = y + (x @ self.v.t()) @ self.u.t()  # low rank via (..., r)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this layer multiplies by, materialised (reference and inspection only)."""
        b, n = self.block_size, self.n
        u, s, i, k = torch.meshgrid(torch.arange(self.r_out), torch.arange(self.r_in), torch.arange(n),
                                    torch.arange(len(self.offsets)), indexing="ij")
        cols = i ^ torch.tensor(self.offsets)[k]  # (R_out, R_in, n, K) input block within the tile
        w = self.blocks.new_zeros(self.r_out * n, self.r_in * n, b, b)  # (out blocks, in blocks, b, b)
        w = w.index_put((u * n + i, s * n + cols), self.blocks, accumulate=True)
        return w.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features) + self.u @ self.v

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: ``F.linear`` with the materialised matrix."""
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, block={self.block_size}, "
                f"offsets={self.offsets}, rank={self.rank}, density={self.density:.3f}")


@dataclass
class ButterflyOptions:
    """``model.options.butterfly_mlp`` / ``model.options.butterfly_attention``: the weight structure."""

    block_size: int = 32  # b: side of each non-zero block
    levels: int = 0  # butterfly factor levels kept in the flat sum; 0: all log2(blocks)
    rank: int = 16  # r of the low-rank term U Vᵀ

    def validate(self, name: str) -> None:
        for key in ("block_size", "rank"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.options.{name}.{key} must be a positive integer, got {getattr(self, key)}")
        if self.levels < 0:
            raise ConfigError(f"model.options.{name}.levels must be >= 0 (0: all levels), got {self.levels}")

    def linear(self, in_features: int, out_features: int, init_std: float, name: str) -> ButterflyLinear:
        """A ButterflyLinear of this structure; ConfigError when the block size does not fit the shapes."""
        blocks = (in_features // self.block_size, out_features // self.block_size)
        n = min(blocks)
        if in_features % self.block_size or out_features % self.block_size or n <= 0 or n & (n - 1) \
                or max(blocks) % n:
            raise ConfigError(f"model.options.{name}.block_size {self.block_size} must divide {in_features} and "
                              f"{out_features} into block counts where the smaller is a power of two dividing "
                              "the larger")
        return ButterflyLinear(in_features, out_features, self.block_size, self.levels, self.rank, init_std=init_std)
