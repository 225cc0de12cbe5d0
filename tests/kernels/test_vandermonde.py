"""Chunked Vandermonde products (the diagonal SSM's kernel and state) against the materialised reference.

Forward and backward, fp64 gradcheck, odd lengths, leading batch dimensions, and lengths up to 64K in fp32
with the error measured against fp64 and compared with the reference's own fp32 error.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.kernels.vandermonde import (
    chunking,
    vandermonde,
    vandermonde_ref,
    vandermonde_transpose,
    vandermonde_transpose_ref,
)
from hybrid_pretrain.models.mixers.ssm import DiagonalSSM
from hybrid_pretrain.tests.kernels.device import DEVICE
from hybrid_pretrain.tests.kernels.tolerance import assert_close_to_exact


def _modes(H: int, d_state: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dtA and w = C dB of an S4D-Lin SSM (H3's init), complex128."""
    torch.manual_seed(seed)
    ssm = DiagonalSSM(H, d_state).double().to(DEVICE)
    with torch.no_grad():
        dtA, dB, C = ssm.discretize()
    return dtA, C * dB


@pytest.mark.parametrize("length", [1, 2, 3, 17, 64, 100, 1001])
@pytest.mark.parametrize("rows", [1, 8])
def test_chunking_covers_the_length(length: int, rows: int) -> None:
    J, C = chunking(length, rows)
    assert J * C >= length > J * (C - 1) and J * J * rows >= length and J <= length


@pytest.mark.parametrize("length", [1, 2, 5, 31, 100, 1023])
def test_forward_equals_reference_fp64(length: int) -> None:
    dtA, w = _modes(4, 16, seed=length)
    torch.testing.assert_close(vandermonde(w, dtA, length), vandermonde_ref(w, dtA, length), rtol=1e-10, atol=1e-12)
    g = torch.randn(2, 3, 4, length, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(vandermonde_transpose(g, dtA), vandermonde_transpose_ref(g, dtA), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("length", [1, 7, 40])
def test_gradcheck_fp64(length: int) -> None:
    """Both custom backwards, every input: w (with and without leading dims), g and the complex dtA."""
    dtA, w = _modes(3, 8, seed=1)
    dtA, w = dtA.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, a: vandermonde(w, a, length), (w, dtA))
    w_batched = torch.randn(2, 3, 4, dtype=torch.complex128, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, a: vandermonde(w, a, length), (w_batched, dtA))
    g = torch.randn(2, 3, length, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(vandermonde_transpose, (g, dtA))


@pytest.mark.parametrize("length", [4096 + 3, 65536])
def test_long_lengths_fp32_as_close_as_the_reference(length: int) -> None:
    """fp32 kernel and its gradients vs fp64, no worse than the materialised fp32 reference (up to 64K)."""
    dtA, w = _modes(2, 16, seed=2)
    dK = torch.randn(2, length, dtype=torch.float64, device=DEVICE)

    def run(fn, dtype):
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        leaves = [w.to(cdtype).requires_grad_(), dtA.to(cdtype).requires_grad_()]
        K = fn(*leaves, length)
        return (K, *torch.autograd.grad((K * dK.to(dtype)).sum(), leaves))

    ours, ref32, exact = run(vandermonde, torch.float32), run(vandermonde_ref, torch.float32), run(vandermonde_ref,
                                                                                                    torch.float64)
    for name, o, t, e in zip(("K", "dw", "d dtA"), ours, ref32, exact):
        assert_close_to_exact(o, t, e, what=f"{name} at L={length}")


def test_state_is_the_recurrence() -> None:
    """vandermonde_transpose of the input read backwards is the SSM state after it (x = dA x + u)."""
    dtA, _ = _modes(3, 8, seed=3)
    u = torch.randn(2, 3, 50, dtype=torch.float64, device=DEVICE)
    state = torch.zeros(2, 3, 4, dtype=torch.complex128, device=DEVICE)
    for t in range(50):
        state = torch.exp(dtA) * state + u[..., t, None]
    torch.testing.assert_close(vandermonde_transpose(u.flip(-1), dtA), state)


def test_no_length_sized_tables_saved_for_backward() -> None:
    """Only w and dtA (each (H, N/2)) are kept between forward and backward, whatever the length."""
    dtA, w = _modes(8, 64, seed=4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        vandermonde(w.requires_grad_(), dtA.requires_grad_(), 8192)
    assert saved and max(saved) <= 8 * 32


def test_rejects_mismatched_shapes() -> None:
    dtA, w = _modes(3, 8, seed=5)
    with pytest.raises(ValueError, match="w \\(..., H, N/2\\)"):
        vandermonde(w[:2], dtA, 10)
    with pytest.raises(ValueError, match="g \\(..., H, L\\)"):
        vandermonde_transpose(torch.randn(2, 4, 10, dtype=torch.float64, device=DEVICE), dtA)


def test_autocast_leaves_the_kernel_in_full_precision() -> None:
    """Under bf16 autocast (as train_throughput --dtype bf16 runs) the kernel's matmuls stay in fp32."""
    dtA, w = _modes(4, 16, seed=6)
    dtA, w = dtA.to(torch.complex64), w.to(torch.complex64)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        K = vandermonde(w, dtA, 300)
        S = vandermonde_transpose(torch.randn(2, 4, 300, device=DEVICE), dtA)
    assert K.dtype == torch.float32 and S.dtype == torch.complex64
    torch.testing.assert_close(K, vandermonde(w, dtA, 300))
