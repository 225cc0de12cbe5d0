"""Kernel tolerances relative to PyTorch's own error in the same dtype; NaN or inf always fails."""

from __future__ import annotations

import torch


def _as_real(t: torch.Tensor) -> torch.Tensor:
    """fp64, complex tensors as (..., 2) real and imaginary parts."""
    return torch.view_as_real(t.resolve_conj()).double() if t.is_complex() else t.double()


def assert_close_to_exact(
    ours: torch.Tensor, torch_same_dtype: torch.Tensor, exact: torch.Tensor, factor: float = 8.0, what: str = ""
) -> None:
    """max|ours - exact| <= factor * max|torch - exact| (+ 1e-6 relative, in case torch is exact by luck).

    Complex tensors are compared over their real and imaginary parts.
    """
    ours, torch_same_dtype, exact = (_as_real(t) for t in (ours, torch_same_dtype, exact))
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = (ours - exact).abs().max().item()
    torch_err = (torch_same_dtype - exact).abs().max().item()
    floor = 1e-6 * max(exact.abs().max().item(), 1.0)
    assert err <= factor * torch_err + floor, f"{what}: error {err:.3g} vs PyTorch's {torch_err:.3g} in the same dtype"
