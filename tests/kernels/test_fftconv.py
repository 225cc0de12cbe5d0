"""fftconv against the O(L^2) definition, forward and backward, odd lengths included."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.kernels.fftconv import fft_length, fftconv, fftconv_path, fftconv_ref, fftconv_torch


def direct_causal_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """y[b, h, t] = sum_{s<=t} k[h, t-s] u[b, h, s] + D[h] u[b, h, t], as a Toeplitz matrix product."""
    L = u.shape[-1]
    lag = torch.arange(L).unsqueeze(1) - torch.arange(L).unsqueeze(0)  # (t, s) -> t - s
    toeplitz = k[:, lag.clamp(min=0)] * (lag >= 0)  # (H, L, L)
    y = torch.einsum("hts,bhs->bht", toeplitz, u)
    return y if D is None else y + D.unsqueeze(-1) * u


def _inputs(B: int, H: int, L: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    k = torch.randn(H, L, generator=g, dtype=torch.float64) / L**0.5
    D = torch.randn(H, generator=g, dtype=torch.float64)
    return u.to(dtype), k.to(dtype), D.to(dtype)


@pytest.mark.parametrize("L", [1, 2, 7, 64, 129])
@pytest.mark.parametrize("with_D", [True, False])
def test_forward_matches_direct_fp64(L: int, with_D: bool) -> None:
    u, k, D = _inputs(2, 3, L, torch.float64)
    D = D if with_D else None
    torch.testing.assert_close(fftconv(u, k, D), direct_causal_conv(u, k, D), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L", [1, 7, 129, 1000])
def test_forward_fp32_error_comparable_to_torch(L: int) -> None:
    """Tolerance relative to PyTorch's own fp32 error on the same sum (exact answer: fp64)."""
    u, k, D = _inputs(2, 4, L, torch.float64, seed=1)
    exact = direct_causal_conv(u, k, D)
    y = fftconv(u.float(), k.float(), D.float())
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    torch_err = (direct_causal_conv(u.float(), k.float(), D.float()).double() - exact).abs().max()
    err = (y.double() - exact).abs().max()
    assert err <= 10 * torch_err + 1e-6, (err, torch_err)


@pytest.mark.parametrize("L", [1, 7, 129])
def test_backward_matches_direct(L: int) -> None:
    u, k, D = (t.requires_grad_() for t in _inputs(2, 3, L, torch.float64, seed=2))
    grad_out = torch.randn(2, 3, L, dtype=torch.float64)
    grads = torch.autograd.grad((fftconv(u, k, D) * grad_out).sum(), (u, k, D))
    expected = torch.autograd.grad((direct_causal_conv(u, k, D) * grad_out).sum(), (u, k, D))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_gradcheck_fp64() -> None:
    u, k, D = (t.requires_grad_() for t in _inputs(2, 3, 5, torch.float64, seed=3))
    assert torch.autograd.gradcheck(fftconv, (u, k, D))
    assert torch.autograd.gradcheck(lambda u, k: fftconv(u, k), (u, k))


def test_half_precision_inputs_keep_dtype() -> None:
    u, k, D = _inputs(2, 3, 33, torch.float64, seed=4)
    y = fftconv(u.bfloat16(), k.bfloat16(), D.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), direct_causal_conv(u, k, D), rtol=2e-2, atol=5e-2)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="k \\(H, L\\)"):
        fftconv(torch.randn(2, 3, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="D of shape"):
        fftconv(torch.randn(2, 3, 8), torch.randn(3, 8), torch.randn(4))


def _smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def test_fft_length_is_the_smallest_fast_size_that_keeps_the_convolution_linear() -> None:
    for L in range(1, 400):
        n = fft_length(L)
        assert n >= 2 * L - 1 and n % 2 == 0 and _smooth(n)
        assert not any(m % 2 == 0 and _smooth(m) for m in range(max(2, 2 * L - 1), n)), L
    assert fft_length(1000) == 2000 and fft_length(1024) == 2048 and fft_length(4097) == 8640


@pytest.mark.parametrize("L", [1, 7, 129, 1000])
def test_torch_path_equals_reference_forward_backward(L: int) -> None:
    """The lean autograd Function (what CPU runs for all but many short sequences) against the reference, fp64."""
    u, k, D = (t.requires_grad_() for t in _inputs(3, 2, L, torch.float64, seed=5))
    dy = torch.randn(3, 2, L, dtype=torch.float64)
    y, y_ref = fftconv_torch(u, k, D), fftconv_ref(u, k, D)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grads, grads_ref = (torch.autograd.grad((out * dy).sum(), (u, k, D)) for out in (y, y_ref))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_dispatch_on_cpu() -> None:
    assert fftconv_path(torch.zeros(1, 4, 1024)) == "torch"
    assert fftconv_path(torch.zeros(8, 256, 40)) == "torch"  # few sequences: the (L, L) matrix would not pay
    assert fftconv_path(torch.zeros(2048, 4, 40)) == "dense"  # H3's synthetic tasks: many short sequences


def test_torch_path_keeps_only_real_inputs_for_backward() -> None:
    """No complex spectrum lives from forward to backward: only u, k and D are saved."""
    u, k, D = (t.requires_grad_() for t in _inputs(4, 3, 200, torch.float32, seed=6))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fftconv_torch(u, k, D)
    assert not any(t.is_complex() for t in saved)
    assert sum(t.numel() for t in saved) == u.numel() + k.numel() + D.numel()
