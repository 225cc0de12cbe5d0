"""The short causal convolution as block-Toeplitz matmuls: how it runs on CPU (and for fp32 on GPU).

Cut each channel into blocks of P steps. Output block b only sees input blocks b - M + 1 .. b,
M = ceil((W - 1) / P) + 1 for W taps, so with the window X_b = u[(b - M + 1) P .. (b + 1) P),

    y[bP + t] = sum_{s < MP} X_b[s] T[s, t],    T[s, t] = k[t + (M - 1) P - s]  (0 outside [0, W)),

one (B L / P, MP) x (MP, P) matmul per channel, batched over channels; T is built once per call and
shared by the batch. It does MP / W times the multiply-adds of the direct sum, but as a GEMM: oneDNN's
depthwise convolution with 64 taps ran 1.7-2.3x slower (``bench/h3_layer.py --ops`` on the 2-core VM).
Backward is again two matmuls. du[bP + t] = sum_j k[j] dy[bP + t + j] is the same product looking ahead:
dU_b = Y_b T' with the window Y_b = dy[bP .. (b + M) P) (zeros past the end) and T'[s, t] = k[s - t], so
no overlap-add pass; dT = X^T dY, whose sums along T's diagonals are dk. Only u and k are saved, X and T
are rebuilt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _lags(P: int, M: int, device: torch.device) -> torch.Tensor:
    """(MP, P) long: the tap k[t + (M-1)P - s] that T[s, t] holds, shifted by P so that every index is >= 0."""
    s = torch.arange(M * P, device=device).unsqueeze(1)
    t = torch.arange(P, device=device).unsqueeze(0)
    return t + M * P - s


def _toeplitz(k: torch.Tensor, P: int, M: int) -> torch.Tensor:
    """k (H, W) -> T (H, MP, P), T[s, t] = k[t + (M-1)P - s] or 0."""
    padded = F.pad(k, (P, (M + 1) * P - k.shape[-1]))  # taps at P .. P + W - 1, zeros around
    # index_select with flat indices: 6x faster than advanced indexing for (768, 80, 16) on the 2-core VM
    return padded.index_select(1, _lags(P, M, k.device).flatten()).view(k.shape[0], M * P, P)


def _toeplitz_ahead(k: torch.Tensor, P: int, M: int) -> torch.Tensor:
    """k (H, W) -> T' (H, MP, P), T'[s, t] = k[s - t] or 0: the look-ahead product of backward."""
    padded = F.pad(k, (P, (M + 1) * P - k.shape[-1]))  # k[j] at P + j
    s = torch.arange(M * P, device=k.device).unsqueeze(1)
    t = torch.arange(P, device=k.device).unsqueeze(0)
    return padded.index_select(1, (s - t + P).flatten()).view(k.shape[0], M * P, P)


def _windows(u: torch.Tensor, P: int, M: int, blocks: int, ahead: bool = False) -> torch.Tensor:
    """u (B, H, L) -> X (H, B * blocks, MP): each block with the M-1 blocks before it (zeros before the start),
    or with `ahead`, with the M-1 blocks after it (zeros past the end)."""
    B, H, L = u.shape
    padded = F.pad(u, (0, (M - 1) * P + blocks * P - L) if ahead else ((M - 1) * P, blocks * P - L))
    # contiguous: the overlapping unfold view would send bmm down a per-matrix copying path
    return padded.unfold(-1, M * P, P).transpose(0, 1).reshape(H, B * blocks, M * P).contiguous()


def block_size(rows: int, length: int) -> int:
    """P for `rows` = B * L positions per channel: about sqrt(rows) / 2, a power of two in [16, 64], and no
    longer than the sequence (rounded up to a power of two).

    Building T costs ~(W + P) P per channel and the windows ~rows (W + P) / P: small P suits one short
    sequence, large P long or batched ones (measured on the 2-core VM: 16 best at B * L = 1K, 64 at 8K).
    """
    P = 1 << min(6, max(4, round(math.log2(max(rows, 1)) / 2 - 1)))
    return min(P, 1 << max(0, (length - 1).bit_length()))


class ToeplitzConv(torch.autograd.Function):
    """y = causal depthwise convolution of u with k by block-Toeplitz matmuls; shapes as ``causal_conv``."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        B, H, L = u.shape
        P = block_size(B * L, L)
        M = -(-(k.shape[-1] - 1) // P) + 1  # blocks per window: the output block and the M - 1 the taps reach
        blocks = -(-L // P)
        y = torch.bmm(_windows(u, P, M, blocks), _toeplitz(k.to(u.dtype), P, M))  # (H, B * blocks, P)
        ctx.save_for_backward(u, k)
        return y.view(H, B, blocks * P)[..., :L].transpose(0, 1)  # (B, H, L), a view

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        u, k = ctx.saved_tensors
        B, H, L = u.shape
        P = block_size(B * L, L)
        M = -(-(k.shape[-1] - 1) // P) + 1
        blocks = -(-L // P)
        du = dk = None
        if ctx.needs_input_grad[0]:  # du = dy's look-ahead windows times T'
            du = torch.bmm(_windows(dy, P, M, blocks, ahead=True), _toeplitz_ahead(k.to(u.dtype), P, M))
            du = du.view(H, B, blocks * P)[..., :L].transpose(0, 1)  # (B, H, L), a view
        if ctx.needs_input_grad[1]:
            dy_blocks = F.pad(dy, (0, blocks * P - L)).transpose(0, 1).reshape(H, B * blocks, P)  # (H, B * blocks, P)
            dT = torch.bmm(_windows(u, P, M, blocks).transpose(1, 2), dy_blocks)  # (H, MP, P)
            dk = torch.zeros(H, (M + 1) * P, device=k.device, dtype=dT.dtype)
            dk.index_add_(1, _lags(P, M, k.device).flatten(), dT.flatten(1))  # sum along T's diagonals
            dk = dk[:, P : P + k.shape[-1]].to(k.dtype)
        return du, dk


def causal_conv_toeplitz(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """u (B, H, L), k (H, W) -> y (B, H, L): ``y[t] = sum_{j < W} k[j] u[t - j]`` by block-Toeplitz matmuls."""
    if k.shape[-1] > u.shape[-1]:  # taps beyond L - 1 only ever meet the zeros before the start
        return ToeplitzConv.apply(u, k[:, : u.shape[-1]])
    return ToeplitzConv.apply(u, k)
