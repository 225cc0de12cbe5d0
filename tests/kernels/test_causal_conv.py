"""The short causal convolution (H3's shift SSM) against its shifted-sum reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_pretrain.kernels.causal_conv import (
    causal_conv,
    causal_conv_conv1d,
    causal_conv_dense,
    causal_conv_path,
    causal_conv_ref,
    causal_conv_toeplitz,
)
from hybrid_pretrain.kernels.causal_conv.toeplitz import block_size
from hybrid_pretrain.kernels.fftconv import fftconv_ref
from hybrid_pretrain.tests.kernels.device import DEVICE
from hybrid_pretrain.tests.kernels.tolerance import assert_close_to_exact

BACKENDS = {"toeplitz": causal_conv_toeplitz, "conv1d": causal_conv_conv1d, "dense": causal_conv_dense}


def _inputs(B: int, H: int, L: int, W: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(t.to(DEVICE) for t in (torch.randn(B, H, L, generator=g, dtype=torch.float64),
                                         torch.randn(H, W, generator=g, dtype=torch.float64),
                                         torch.randn(H, generator=g, dtype=torch.float64)))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("B,L,W", [(2, 1, 4), (2, 3, 8), (2, 40, 64), (1, 129, 64), (3, 100, 7), (4, 64, 64),
                                   (2, 1000, 64), (1, 4097, 64)])
def test_forward_backward_equal_reference_fp64(backend: str, B: int, L: int, W: int) -> None:
    u, k, D = (t.requires_grad_() for t in _inputs(B, 3, L, W, seed=L))
    dy = torch.randn(B, 3, L, dtype=torch.float64, device=DEVICE)
    conv = BACKENDS[backend]
    y, y_ref = conv(u, k), causal_conv_ref(u, k)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((y * dy).sum(), (u, k))
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), (u, k))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("L,W", [(9, 4), (37, 20), (5, 64)])
def test_gradcheck_fp64(L: int, W: int) -> None:
    u, k, D = (t.requires_grad_() for t in _inputs(2, 3, L, W, seed=1))
    assert torch.autograd.gradcheck(causal_conv, (u, k, D))
    assert torch.autograd.gradcheck(causal_conv_toeplitz, (u, k))
    assert torch.autograd.gradcheck(causal_conv_dense, (u, k, D))


def test_equals_fft_convolution_with_the_zero_padded_kernel() -> None:
    """An N-tap filter is the long convolution whose kernel is zero beyond N (what the FFT path computed)."""
    u, k, D = _inputs(2, 4, 300, 64, seed=2)
    torch.testing.assert_close(causal_conv(u, k, D), fftconv_ref(u, F.pad(k, (0, 300 - 64)), D))


def test_fp32_error_comparable_to_torch() -> None:
    u, k, D = _inputs(2, 8, 2048, 64, seed=3)
    exact = causal_conv_ref(u, k, D)
    assert_close_to_exact(causal_conv(u.float(), k.float(), D.float()),
                          causal_conv_ref(u.float(), k.float(), D.float()), exact)


def test_bf16_keeps_dtype() -> None:
    u, k, D = _inputs(2, 3, 50, 16, seed=4)
    y = causal_conv(u.bfloat16(), k.bfloat16(), D.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), causal_conv_ref(u, k, D), rtol=3e-2, atol=1e-1)


def test_dispatch_and_block_sizes() -> None:
    assert causal_conv_path(torch.zeros(1, 1, 1024)) == "toeplitz"  # CPU
    assert causal_conv_path(torch.zeros(32, 32, 40)) == "dense"  # many short sequences
    assert [block_size(n, 1 << 20) for n in (1, 1024, 4096, 8192, 1 << 20)] == [16, 16, 32, 64, 64]
    assert block_size(1 << 20, 40) == 64 and block_size(1 << 20, 20) == 32 and block_size(8, 3) == 4
    with pytest.raises(ValueError, match="k \\(H, W\\)"):
        causal_conv(torch.zeros(1, 3, 8), torch.zeros(2, 4))
