"""FlashAttention (Dao et al. 2022; the FlashAttention-2 loop order) in Triton, dense-causal and block-sparse.

Forward: one program per (query block, batch x head) streams the key/value blocks through SRAM,
keeping a running max m, normaliser l and unnormalised output (online softmax), so the (L, L) score
matrix never exists in memory; it stores O and the log-sum-exp per query. Backward recomputes the
scores block by block from the saved log-sum-exp: one kernel per key block accumulates dK and dV,
one per query block accumulates dQ (no atomics). A block mask, (H or 1, Lq/BLOCK, Lk/BLOCK) bool,
skips whole (query block, key block) tiles; the tile size is the mask's block size. Math in README.md.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hybrid_pretrain.kernels._triton import INTERPRETED, jit


@jit
def _scores(q, k, offs_m, offs_n, Lk, scale, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores of a tile, -inf where the key is past the end or in the future."""
    s = tl.dot(q, tl.trans(k)) * scale
    keep = offs_n[None, :] < Lk
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(keep, s, float("-inf"))


@jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, MASK, scale, H, Lq, Lk, d, mask_stride_h, n_kb,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + bh * Lq * d + offs_m[:, None] * d + offs_d[None, :],
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < d), other=0.0)
    q = q.to(tl.float32) if UPCAST else q
    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK,), 0.0, tl.float32)
    acc = tl.full((BLOCK, BLOCK_D), 0.0, tl.float32)
    hi = tl.minimum(Lk, (pid_m + 1) * BLOCK) if CAUSAL else Lk
    for start_n in range(0, hi, BLOCK):
        visit = True
        if HAS_MASK:
            visit = tl.load(MASK + (bh % H) * mask_stride_h + pid_m * n_kb + start_n // BLOCK) != 0
        if visit:
            offs_n = start_n + tl.arange(0, BLOCK)
            kv_mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < d)
            k = tl.load(K + bh * Lk * d + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
            k = k.to(tl.float32) if UPCAST else k
            v = tl.load(V + bh * Lk * d + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
            v = v.to(tl.float32) if UPCAST else v
            s = _scores(q, k, offs_m, offs_n, Lk, scale, CAUSAL)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp(-inf) = 0
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # a query with no visible key outputs 0
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))  # +inf: zero probabilities in bwd
    tl.store(Out + bh * Lq * d + offs_m[:, None] * d + offs_d[None, :], o.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < d))
    tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, scale, H, Lq, Lk, d, mask_stride_h, n_kb,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (key block, batch x head): dV = Pᵀ dO, dK = scale dSᵀ Q over every query block."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < d)
    k = tl.load(K + bh * Lk * d + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
    k = k.to(tl.float32) if UPCAST else k
    v = tl.load(V + bh * Lk * d + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
    v = v.to(tl.float32) if UPCAST else v
    dk = tl.full((BLOCK, BLOCK_D), 0.0, tl.float32)
    dv = tl.full((BLOCK, BLOCK_D), 0.0, tl.float32)
    lo = pid_n * BLOCK if CAUSAL else 0  # earlier queries cannot see this key block
    for start_m in range(lo, Lq, BLOCK):
        visit = True
        if HAS_MASK:
            visit = tl.load(MASK + (bh % H) * mask_stride_h + (start_m // BLOCK) * n_kb + pid_n) != 0
        if visit:
            offs_m = start_m + tl.arange(0, BLOCK)
            q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < d)
            q = tl.load(Q + bh * Lq * d + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
            q = q.to(tl.float32) if UPCAST else q
            do = tl.load(DO + bh * Lq * d + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
            do = do.to(tl.float32) if UPCAST else do
            lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
            delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
            p = tl.exp(_scores(q, k, offs_m, offs_n, Lk, scale, CAUSAL) - lse[:, None])  # (BLOCK_M, BLOCK_N)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])  # softmax backward: dS = P (dP - rowsum(dO O))
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + bh * Lk * d + offs_n[:, None] * d + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + bh * Lk * d + offs_n[:, None] * d + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, scale, H, Lq, Lk, d, mask_stride_h, n_kb,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (query block, batch x head): dQ = scale dS K over every key block."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < d)
    q = tl.load(Q + bh * Lq * d + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) if UPCAST else q
    do = tl.load(DO + bh * Lq * d + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
    do = do.to(tl.float32) if UPCAST else do
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    dq = tl.full((BLOCK, BLOCK_D), 0.0, tl.float32)
    hi = tl.minimum(Lk, (pid_m + 1) * BLOCK) if CAUSAL else Lk
    for start_n in range(0, hi, BLOCK):
        visit = True
        if HAS_MASK:
            visit = tl.load(MASK + (bh % H) * mask_stride_h + pid_m * n_kb + start_n // BLOCK) != 0
        if visit:
            offs_n = start_n + tl.arange(0, BLOCK)
            kv_mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < d)
            k = tl.load(K + bh * Lk * d + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
            k = k.to(tl.float32) if UPCAST else k
            v = tl.load(V + bh * Lk * d + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
            v = v.to(tl.float32) if UPCAST else v
            p = tl.exp(_scores(q, k, offs_m, offs_n, Lk, scale, CAUSAL) - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + bh * Lq * d + offs_m[:, None] * d + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


def _upcast(q: torch.Tensor) -> bool:
    """Half-precision tiles go to tl.dot as they are on GPU; the interpreter's numpy matmul has no bf16, so fp32."""
    return INTERPRETED and q.dtype in (torch.bfloat16, torch.float16)


def _mask_args(block_mask: torch.Tensor | None, H: int, Lq: int, Lk: int, block: int, device) -> tuple:
    """(mask tensor, per-head stride, key blocks per row), validating the layout (H or 1, ceil(Lq/b), ceil(Lk/b))."""
    n_qb, n_kb = triton.cdiv(Lq, block), triton.cdiv(Lk, block)
    if block_mask is None:
        return torch.empty(1, dtype=torch.int8, device=device), 0, n_kb
    if block_mask.dim() != 3 or block_mask.shape[0] not in (1, H) or block_mask.shape[1:] != (n_qb, n_kb):
        raise ValueError(
            f"block_mask must be (H or 1, {n_qb}, {n_kb}) for Lq={Lq}, Lk={Lk}, block={block}, "
            f"got {tuple(block_mask.shape)}"
        )
    mask = block_mask.to(device=device, dtype=torch.int8).contiguous()
    return mask, (n_qb * n_kb if mask.shape[0] == H else 0), n_kb


class FlashAttentionTriton(torch.autograd.Function):
    """Autograd wrapper of the three kernels; shapes as ``flash_attention_triton``."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, block_mask: torch.Tensor | None, block: int):
        B, H, Lq, d = q.shape
        Lk = k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask, mask_stride, n_kb = _mask_args(block_mask, H, Lq, Lk, block, q.device)
        o = torch.empty_like(q)
        lse = torch.empty(B * H, Lq, device=q.device, dtype=torch.float32)
        block_d = max(16, triton.next_power_of_2(d))
        _attn_fwd_kernel[(triton.cdiv(Lq, block), B * H)](
            q, k, v, o, lse, mask, scale, H, Lq, Lk, d, mask_stride, n_kb,
            CAUSAL=causal, HAS_MASK=block_mask is not None, BLOCK=block, BLOCK_D=block_d, UPCAST=_upcast(q),
        )
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.args = (causal, scale, block_mask is not None, mask_stride, n_kb, block, block_d)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        causal, scale, has_mask, mask_stride, n_kb, block, block_d = ctx.args
        B, H, Lq, d = q.shape
        Lk = k.shape[2]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).view(B * H, Lq)  # rowsum(dO O), one cheap reduction
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(CAUSAL=causal, HAS_MASK=has_mask, BLOCK=block, BLOCK_D=block_d, UPCAST=_upcast(q))
        _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, block), B * H)](
            q, k, v, do, lse, delta, dk, dv, mask, scale, H, Lq, Lk, d, mask_stride, n_kb, **common
        )
        _attn_bwd_dq_kernel[(triton.cdiv(Lq, block), B * H)](
            q, k, v, do, lse, delta, dq, mask, scale, H, Lq, Lk, d, mask_stride, n_kb, **common
        )
        return dq, dk, dv, None, None, None, None


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_mask: torch.Tensor | None = None,
    block: int = 64,
) -> torch.Tensor:
    """Tiled attention. q: (B, H, Lq, d); k, v: (B, H, Lk, d); block_mask: (H or 1, ceil(Lq/block), ceil(Lk/block))
    bool or None -> o: (B, H, Lq, d) in q's dtype. ``block`` (a power of two >= 16) is the tile and mask block size.

    Compiled on CUDA tensors, interpreted on CPU tensors (slow: for tests).
    """
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (tl.dot tiles), got {block}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return FlashAttentionTriton.apply(q, k, v, causal, scale, block_mask, block)
