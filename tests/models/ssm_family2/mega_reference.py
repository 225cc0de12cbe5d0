"""Mega written out loop by loop from the paper's equations, reading a `Mega` module's parameters.

The EMA is the per-step recurrence over its h dims (no kernel, no FFT), rotary is a complex rotation, and
attention is an explicit softmax per query over the keys of its own chunk: an independent check of
models.mixers.mega's FFT convolution, chunk reshapes and fused projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROTARY_BASE = 10000.0


def ema_reference(mega, x: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) -> EMA(x) + omega x, (B, L, D), by h_t = a b x_t + (1 - a d) h_t-1 (and backwards)."""
    ema = mega.ema
    a, d = torch.sigmoid(ema.alpha), torch.sigmoid(ema.delta)  # (dirs, D, h)
    eta = ema.eta / math.sqrt(ema.ema_dim)
    B, L, D = x.shape
    out = ema.omega * x
    for c in range(ema.alpha.shape[0]):
        h = torch.zeros(B, D, ema.ema_dim, dtype=x.dtype)
        times = range(L) if c == 0 else range(L - 1, -1, -1)  # direction 1 reads from the end
        ys = {}
        for t in times:
            h = a[c] * ema.beta[c] * x[:, t, :, None] + (1 - a[c] * d[c]) * h
            ys[t] = (eta[c] * h).sum(-1)
        out = out + torch.stack([ys[t] for t in range(L)], dim=1)
    return out


def rotate(z: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, L, z): pairs (i, i + z/2) as complex numbers times exp(i pos base^(-i/(z/2)))."""
    half = z.shape[-1] // 2
    freq = ROTARY_BASE ** (-torch.arange(half, dtype=z.dtype) / half)
    phase = torch.polar(torch.ones(len(positions), half, dtype=z.dtype), positions[:, None].to(z.dtype) * freq)
    c = torch.complex(z[..., :half], z[..., half:]) * phase
    return torch.cat([c.real, c.imag], dim=-1)


def mega_reference(mega, x: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) -> the Mega mixer's output phi * (H^ - X), (B, L, D)."""
    B, L, D = x.shape
    mx = F.silu(ema_reference(mega, x))
    v = F.silu(x @ mega.v_proj.weight.T + mega.v_proj.bias)  # (B, L, v)
    base = mx @ mega.mx_proj.weight.T + mega.mx_proj.bias
    zd, vd = mega.z_dim, mega.v_dim
    update = torch.sigmoid(base[..., :D])
    z = F.silu(base[..., D : D + zd])
    reset = F.silu(base[..., D + zd : D + zd + vd])
    hx = base[..., D + zd + vd :]
    pos = torch.arange(L)
    q = rotate(z * mega.qk_scale[0] + mega.qk_offset[0], pos)
    k = rotate(z * mega.qk_scale[1] + mega.qk_offset[1], pos)
    c = mega.chunk_size or L
    o = torch.zeros(B, L, vd, dtype=x.dtype)
    for t in range(L):
        start = t // c * c
        stop = t + 1 if not mega.bidirectional else min(start + c, L)
        scores = torch.einsum("bz,bsz->bs", q[:, t], k[:, start:stop]) / math.sqrt(zd)
        o[:, t] = torch.einsum("bs,bsv->bv", scores.softmax(-1), v[:, start:stop])
    h = F.silu(hx + (reset * o) @ mega.out_proj.weight.T + mega.out_proj.bias)
    return update * (h - x)
