"""The parallel associative scan equals the sequential recurrence, values and gradients."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.models.scan import linear_scan, linear_scan_ref


@pytest.mark.parametrize("L", [1, 2, 3, 7, 16, 37])
def test_parallel_equals_sequential_complex_with_initial_state(L: int) -> None:
    a = torch.randn(2, L, 5, dtype=torch.complex128) * 0.7
    b = torch.randn(2, L, 5, dtype=torch.complex128)
    x0 = torch.randn(2, 5, dtype=torch.complex128)
    torch.testing.assert_close(linear_scan(a, b, dim=1, x0=x0), linear_scan_ref(a, b, dim=1, x0=x0))


def test_time_invariant_decay_broadcasts_and_reverse_runs_backwards() -> None:
    a = torch.rand(6, dtype=torch.float64)  # one decay per channel, the same at every step (S5, DLR)
    b = torch.randn(3, 11, 6, dtype=torch.float64)
    torch.testing.assert_close(linear_scan(a, b, dim=1), linear_scan_ref(a, b, dim=1))
    back = linear_scan(a, b, dim=1, reverse=True)
    torch.testing.assert_close(back, linear_scan_ref(a, b.flip(1), dim=1).flip(1))
    torch.testing.assert_close(back[:, 3], a * back[:, 4] + b[:, 3])  # x_k = a x_k+1 + b_k


def test_gradients_match_the_sequential_recurrence() -> None:
    a = (torch.rand(9, 4, dtype=torch.float64) * 0.9).requires_grad_()
    b = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64)
    grads = [torch.autograd.grad((fn(a, b, dim=0) * w).sum(), (a, b)) for fn in (linear_scan, linear_scan_ref)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_float32_long_sequence_stays_close() -> None:
    a = torch.rand(1, 1000, 8) * 0.2 + 0.8
    b = torch.randn(1, 1000, 8)
    torch.testing.assert_close(linear_scan(a, b), linear_scan_ref(a, b), rtol=1e-4, atol=1e-4)
