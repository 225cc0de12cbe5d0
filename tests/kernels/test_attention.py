"""FlashAttention and its block-sparse variant (Triton, interpreted on CPU) against the explicit-softmax reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_pretrain.kernels.attention import attention, attention_path, attention_ref, flash_attention_triton
from hybrid_pretrain.tests.kernels.device import DEVICE
from hybrid_pretrain.tests.kernels.tolerance import assert_close_to_exact

BLOCK = 16  # the smallest tl.dot tile: keeps the interpreter fast


def _qkv(B: int, H: int, L: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, d, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(4))  # q, k, v, do


def _run(fn, q, k, v, do, dtype):
    """(o, dq, dk, dv) of fn on inputs cast to dtype."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    return (o, *torch.autograd.grad((o * do.to(dtype)).sum(), leaves))


def _check(fn_ours, fn_ref, q, k, v, do, what: str) -> None:
    ours = _run(fn_ours, q, k, v, do, torch.float32)
    torch32 = _run(fn_ref, q, k, v, do, torch.float32)
    exact = _run(fn_ref, q, k, v, do, torch.float64)
    for name, o, t, e in zip(("o", "dq", "dk", "dv"), ours, torch32, exact):
        assert o.dtype == torch.float32
        assert_close_to_exact(o, t, e, what=f"{what} {name}")


@pytest.mark.parametrize("L,d,causal", [(1, 8, True), (17, 8, True), (37, 20, True), (37, 16, False), (50, 8, False)])
def test_flash_forward_backward_match_reference(L: int, d: int, causal: bool) -> None:
    q, k, v, do = _qkv(2, 2, L, d, seed=L + d)
    _check(
        lambda q, k, v: flash_attention_triton(q, k, v, causal, block=BLOCK),
        lambda q, k, v: attention_ref(q, k, v, causal),
        q, k, v, do, what=f"L={L} d={d} causal={causal}",
    )


@pytest.mark.parametrize("heads_in_mask", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_matches_reference(heads_in_mask: int, causal: bool) -> None:
    """Random block layout (per head or broadcast), odd length, one query block that sees nothing (output 0)."""
    L, H = 45, 2
    n = -(-L // BLOCK)
    g = torch.Generator().manual_seed(heads_in_mask + 2 * causal)
    mask = (torch.rand(heads_in_mask, n, n, generator=g) > 0.4).to(DEVICE)
    mask[:, :, 0] = True
    mask[0, n - 1] = False  # the last query block of head 0 sees no key
    q, k, v, do = _qkv(2, H, L, 8, seed=7)
    _check(
        lambda q, k, v: flash_attention_triton(q, k, v, causal, block_mask=mask, block=BLOCK),
        lambda q, k, v: attention_ref(q, k, v, causal, block_mask=mask, block=BLOCK),
        q, k, v, do, what=f"mask heads={heads_in_mask} causal={causal}",
    )
    o = flash_attention_triton(q.float(), k.float(), v.float(), causal, block_mask=mask, block=BLOCK)
    assert (o[:, 0, (n - 1) * BLOCK :] == 0).all()


def test_bf16_error_comparable_to_sdpa() -> None:
    q, k, v, _ = _qkv(1, 2, 33, 16, seed=3)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    o = flash_attention_triton(qb, kb, vb, True, block=BLOCK)
    assert o.dtype == torch.bfloat16
    exact = attention_ref(qb.double(), kb.double(), vb.double(), True)
    assert_close_to_exact(o, F.scaled_dot_product_attention(qb, kb, vb, is_causal=True), exact, what="bf16")


def test_public_op_on_cpu_uses_sdpa_or_reference() -> None:
    q, k, v, _ = _qkv(2, 2, 21, 8, seed=4)
    assert attention_path(q) == "sdpa"
    torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v, True))
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    mask[0, 1, 1] = False
    assert attention_path(q, mask) == "reference"
    torch.testing.assert_close(
        attention(q, k, v, block_mask=mask, block=BLOCK), attention_ref(q, k, v, True, block_mask=mask, block=BLOCK)
    )


def test_validation_messages() -> None:
    q = torch.zeros(1, 2, 20, 8)
    with pytest.raises(ValueError, match="block_mask must be \\(H or 1, 2, 2\\)"):
        flash_attention_triton(q, q, q, block_mask=torch.ones(2, 3, 2, dtype=torch.bool), block=BLOCK)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention_triton(q, q, q, block=24)
    with pytest.raises(ValueError, match="k, v \\(B, H, Lk, d\\)"):
        attention(q, q[..., :4], q)
