"""H3's multi-head memory: the quadratic form against the outer-product definition, forward and backward."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.kernels.ssm_memory import ssm_memory, ssm_memory_kv, ssm_memory_path, ssm_memory_quadratic
from hybrid_pretrain.models.mixers.ssm import DiagonalSSM
from hybrid_pretrain.tests.kernels.tolerance import assert_close_to_exact


def _inputs(B: int, d: int, H: int, L: int, dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    ssm = DiagonalSSM(H, 16).to(dtype if dtype == torch.float64 else torch.float32)
    q, k, v = (torch.randn(B, H, d, L, dtype=dtype, requires_grad=True) for _ in range(3))
    return (q, k, v), ssm


@pytest.mark.parametrize("B,d,H,L", [(2, 8, 3, 1), (2, 8, 3, 37), (1, 4, 2, 64), (3, 16, 2, 100), (2, 2, 5, 9)])
@pytest.mark.parametrize("skip", [True, False])
def test_quadratic_equals_the_definition_fp64(B: int, d: int, H: int, L: int, skip: bool) -> None:
    (q, k, v), ssm = _inputs(B, d, H, L, seed=L)
    params = (*ssm.discretize(), ssm.D if skip else None)
    ours, ref = ssm_memory_quadratic(q, k, v, *params), ssm_memory_kv(q, k, v, *params)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(ref)
    wrt = [q, k, v, ssm.log_dt, ssm.log_A_real, ssm.A_imag, ssm.C] + ([ssm.D] if skip else [])
    grads = torch.autograd.grad(ours, wrt, dy, retain_graph=True)  # the discretisation is shared
    for g, g_ref in zip(grads, torch.autograd.grad(ref, wrt, dy), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_quadratic_gradcheck() -> None:
    (q, k, v), ssm = _inputs(2, 8, 2, 11)
    dtA, dB, C = (t.detach().requires_grad_() for t in ssm.discretize())
    D = ssm.D.detach().requires_grad_()
    assert torch.autograd.gradcheck(ssm_memory_quadratic, (q, k, v, dtA, dB, C, D))


def test_path_follows_the_measured_rule() -> None:
    def path(d: int, L: int) -> str:
        return ssm_memory_path(torch.empty(2, 3, d, L))

    assert path(8, 64) == path(8, 96) == path(16, 192) == "quadratic"  # wide heads, short sequences
    assert path(8, 97) == path(4, 32) == path(1, 40) == path(16, 4096) == "kv"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_keep_the_fp32_island(dtype: torch.dtype) -> None:
    """bf16 q, k, v come back bf16 and at most bf16's own rounding away from the exact result."""
    (q, k, v), ssm = _inputs(2, 8, 3, 50, dtype=dtype)
    params = (*ssm.discretize(), ssm.D)
    exact = ssm_memory_kv(*(t.detach().double() for t in (q, k, v)), *(p.detach().to(torch.complex128)
                          for p in params[:3]), params[3].detach().double())
    assert ssm_memory_path(q) == "quadratic"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = ssm_memory(q, k, v, *params)
    assert ours.dtype == dtype
    assert_close_to_exact(ours, exact.to(dtype), exact, factor=2.0, what=str(dtype))


def test_shapes_are_checked() -> None:
    (q, k, v), ssm = _inputs(2, 8, 3, 10)
    with pytest.raises(ValueError, match="ssm_memory expects q, k, v"):
        ssm_memory(q, k[:, :, :4], v, *ssm.discretize(), ssm.D)


@pytest.mark.parametrize("d,L", [(8, 37), (2, 40)])  # the quadratic path and the kv path
def test_a_kept_kernel_gives_the_same_memory(d: int, L: int) -> None:
    """A kernel longer than L (``DiagonalSSM`` keeps the longest asked) gives what ssm_memory would build."""
    (q, k, v), ssm = _inputs(2, d, 3, L)
    params = (*ssm.discretize(), ssm.D)
    with torch.no_grad():
        kept = ssm.kernel(L + 25)
        torch.testing.assert_close(ssm_memory(q, k, v, *params, kernel_of=lambda n: kept[:, :n]),
                                   ssm_memory(q, k, v, *params), rtol=1e-12, atol=1e-12)

