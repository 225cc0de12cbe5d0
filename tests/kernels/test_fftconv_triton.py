"""The Triton FlashConv kernel (forward and backward) against the torch.fft reference, under Triton's interpreter.

Tolerances are relative to the reference's own error in the same dtype, both measured against fp64.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.kernels.fftconv import fftconv_path, fftconv_ref, fftconv_triton
from hybrid_pretrain.kernels.fftconv.triton_fftconv import MAX_LEN, fft_shape
from hybrid_pretrain.tests.kernels.device import DEVICE
from hybrid_pretrain.tests.kernels.tolerance import assert_close_to_exact


def _inputs(B: int, H: int, L: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    k = torch.randn(H, L, generator=g, dtype=torch.float64) / L**0.5
    D = torch.randn(H, generator=g, dtype=torch.float64)
    dy = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    return u.to(DEVICE), k.to(DEVICE), D.to(DEVICE), dy.to(DEVICE)


def _grads(fn, u, k, D, dy, dtype):
    """(y, du, dk, dD) of fn on inputs cast to dtype; dD is None without D."""
    leaves = [t.to(dtype).requires_grad_() for t in (u, k)] + ([D.to(dtype).requires_grad_()] if D is not None else [])
    y = fn(*leaves[:2], leaves[2] if D is not None else None)
    grads = torch.autograd.grad((y * dy.to(dtype)).sum(), leaves)
    return (y, *grads) + ((None,) if D is None else ())


@pytest.mark.parametrize("L", [1, 7, 100, 257])
@pytest.mark.parametrize("with_D", [True, False])
def test_forward_backward_match_reference(L: int, with_D: bool) -> None:
    u, k, D, dy = _inputs(2, 3, L, seed=L)
    D = D if with_D else None
    ours = _grads(fftconv_triton, u, k, D, dy, torch.float32)
    torch32 = _grads(fftconv_ref, u, k, D, dy, torch.float32)
    exact = _grads(fftconv_ref, u, k, D, dy, torch.float64)
    for name, o, t, e in zip(("y", "du", "dk", "dD"), ours, torch32, exact):
        if e is not None:
            assert o.dtype == torch.float32
            assert_close_to_exact(o, t, e, what=f"{name} at L={L}")


def test_bf16_inputs_keep_dtype() -> None:
    u, k, D, _ = _inputs(2, 2, 129, seed=5)
    y = fftconv_triton(u.bfloat16(), k.bfloat16(), D.bfloat16())
    assert y.dtype == torch.bfloat16
    exact = fftconv_ref(u.bfloat16().double(), k.bfloat16().double(), D.bfloat16().double())
    assert_close_to_exact(y, fftconv_ref(u.bfloat16(), k.bfloat16(), D.bfloat16()), exact, what="bf16 y")


@pytest.mark.parametrize("L", [1, 255, 256, 257, 4097, MAX_LEN])
def test_fft_shape_is_a_valid_factorisation(L: int) -> None:
    N1, N2 = fft_shape(L)
    assert N1 * N2 >= 2 * L and N1 // 2 >= 16 and N2 >= 16  # linear convolution; tl.dot's minimum tile
    assert N1 & (N1 - 1) == 0 and N2 & (N2 - 1) == 0 and N2 <= N1 <= 2 * N2


def test_rejects_sequences_beyond_one_program() -> None:
    with pytest.raises(ValueError, match="state passing"):
        fftconv_triton(torch.zeros(1, 1, MAX_LEN + 1), torch.zeros(1, MAX_LEN + 1))


def test_dispatch_on_cpu_is_torch_fft() -> None:
    assert fftconv_path(torch.zeros(1, 1, 64)) == "torch"
