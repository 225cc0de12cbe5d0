"""State passing (chunked diagonal SSM) against the one-convolution reference, up to L = 64K, forward and backward."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.kernels.fftconv import (
    fftconv_triton,
    ssm_conv,
    ssm_conv_path,
    ssm_conv_ref,
    ssm_conv_state_passing,
)
from hybrid_pretrain.models.mixers.ssm import DiagonalSSM
from hybrid_pretrain.tests.kernels.device import DEVICE
from hybrid_pretrain.tests.kernels.ssm_params import cast, ssm_params
from hybrid_pretrain.tests.kernels.tolerance import assert_close_to_exact


@pytest.mark.parametrize("L,chunk", [(1, 4), (5, 2), (37, 8), (64, 64), (100, 7)])
def test_forward_backward_equal_reference_fp64(L: int, chunk: int) -> None:
    """Every input's gradient, including the complex SSM parameters, equals the reference's."""
    params = ssm_params(3, 8, seed=L, grad=True)
    u = torch.randn(2, 3, L, dtype=torch.float64, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 3, L, dtype=torch.float64, device=DEVICE)
    y = ssm_conv_state_passing(u, *params, chunk=chunk)
    y_ref = ssm_conv_ref(u, *params)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((y * dy).sum(), [u, *params])
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), [u, *params])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("L,chunk", [(16384, 8192), (16384 + 3, 4096), (65536, 8192)])
def test_long_sequences_match_reference_fp32(L: int, chunk: int) -> None:
    """fp32 state passing is as close to the fp64 answer as the fp32 full-length FFT convolution is."""
    params = ssm_params(2, 16, seed=0)
    u = torch.randn(1, 2, L, dtype=torch.float64, device=DEVICE)
    exact = ssm_conv_ref(u, *params)
    ours = ssm_conv_state_passing(u.float(), *cast(params, torch.float32), chunk=chunk)
    assert ours.dtype == torch.float32
    assert_close_to_exact(ours, ssm_conv_ref(u.float(), *cast(params, torch.float32)), exact, what=f"L={L}")


def test_state_passing_with_triton_chunks() -> None:
    """The GPU composition: chunks through the fused Triton kernel (interpreted here), forward and backward."""
    params = ssm_params(2, 8, seed=1)
    u = torch.randn(2, 2, 45, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(2, 2, 45, dtype=torch.float64, device=DEVICE)

    def run(fn, real):
        leaves = [t.requires_grad_() for t in (u.to(real), *cast(params, real))]
        y = fn(*leaves)
        return (y, *torch.autograd.grad((y * dy.to(real)).sum(), leaves))

    ours = run(lambda *a: ssm_conv_state_passing(*a, chunk=16, conv=fftconv_triton), torch.float32)
    torch32 = run(ssm_conv_ref, torch.float32)
    exact = run(ssm_conv_ref, torch.float64)
    for name, o, t, e in zip(("y", "du", "d dtA", "d dB", "d C", "dD"), ours, torch32, exact):
        assert_close_to_exact(o, t, e, what=name)


def test_diagonal_ssm_goes_through_ssm_conv() -> None:
    """H3's diagonal SSM output equals the state-passing path at a length spanning several chunks."""
    ssm = DiagonalSSM(4, 8).double().to(DEVICE)
    u = torch.randn(2, 4, 300, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ssm(u), ssm_conv_state_passing(u, *ssm.discretize(), ssm.D, chunk=64))


def test_dispatch_and_validation() -> None:
    with torch.no_grad():  # (with autograd, CPU sequences from 1K take the chunked path: test_ssm_chunked.py)
        assert ssm_conv_path(torch.zeros(1, 1, 1 << 14)) == "fftconv"  # CPU: one pocketfft convolution up to 16K
        assert ssm_conv_path(torch.zeros(1, 1, 1 << 15)) == "state_passing"  # beyond: less time and memory
    dtA, dB, C, D = ssm_params(3, 8, seed=2)
    with pytest.raises(ValueError, match="dtA, dB, C \\(H, N/2\\)"):
        ssm_conv(torch.zeros(1, 2, 8, dtype=torch.float64, device=DEVICE), dtA, dB, C, D)
