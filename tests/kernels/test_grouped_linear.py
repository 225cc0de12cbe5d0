"""grouped_linear, every path (the fused per-group loop, torch's grouped_mm, the F.linear reference) against a
row-by-row definition in fp64, forward and backward, with empty and odd-sized groups; tolerance relative to
PyTorch's own error in the dtype."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.kernels.grouped_linear import grouped_linear, grouped_linear_path
from hybrid_pretrain.tests.kernels.tolerance import assert_close_to_exact


def row_by_row(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], sizes: list[int]
               ) -> torch.Tensor:
    """Each row times its group's weight, one vector-matrix product at a time."""
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # (N,)
    return torch.stack([weights[g] @ x[i] + biases[g] for i, g in enumerate(group.tolist())])


def _inputs(sizes: list[int], k: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=g, dtype=torch.float64)
    weights = [torch.randn(m, k, generator=g, dtype=torch.float64) / k**0.5 for _ in sizes]
    biases = [torch.randn(m, generator=g, dtype=torch.float64) for _ in sizes]
    return x, weights, biases


def _grads(y: torch.Tensor, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, inputs, dy, allow_unused=True, materialize_grads=True))  # empty groups: 0


SIZES = [[5], [3, 0, 7, 1], [0, 0, 4], [2, 9, 0, 0, 6, 1, 3, 0]]


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("path", ["loop", "grouped_mm", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_row_by_row(sizes: list[int], path: str, dtype: torch.dtype) -> None:
    x, weights, biases = _inputs(sizes, k=24, m=40)
    dy = torch.randn(sum(sizes), 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [t.requires_grad_() for t in (x, *weights, *biases)]
    exact = row_by_row(x, weights, biases, sizes)
    exact_grads = _grads(exact, leaves, dy)
    low = [t.detach().to(dtype).requires_grad_() for t in leaves]
    n = len(sizes)
    ours = grouped_linear(low[0], low[1:1 + n], low[1 + n:], sizes, path=path)
    assert ours.dtype == dtype and ours.shape == exact.shape
    torch_y = row_by_row(low[0], low[1:1 + n], low[1 + n:], sizes)  # PyTorch's own error in this dtype
    assert_close_to_exact(ours, torch_y, exact, what=f"{path} forward")
    for i, (g, tg, eg) in enumerate(zip(_grads(ours, low, dy.to(dtype)), _grads(torch_y, low, dy.to(dtype)),
                                        exact_grads)):
        assert_close_to_exact(g, tg, eg, what=f"{path} gradient of input {i}")


@pytest.mark.parametrize("path", ["loop", "grouped_mm", "reference"])
def test_empty_groups_get_zero_weight_gradients_and_a_summed_output_backpropagates(path: str) -> None:
    x, weights, biases = _inputs([4, 0, 3], k=8, m=16)
    leaves = [t.float().requires_grad_() for t in (x, *weights, *biases)]
    grouped_linear(leaves[0], leaves[1:4], leaves[4:], [4, 0, 3], path=path).sum().backward()  # a stride-0 gradient
    assert (leaves[2].grad == 0).all() and (leaves[5].grad == 0).all()
    assert all(t.grad.abs().sum() > 0 for i, t in enumerate(leaves) if i not in (2, 5))


def test_loop_gives_weight_gradients_without_an_input_gradient() -> None:
    x, weights, biases = _inputs([3, 2], k=8, m=4)
    w = [t.float().requires_grad_() for t in weights]
    grouped_linear(x.float(), w, [b.float() for b in biases], [3, 2], path="loop").sum().backward()
    assert all(t.grad.abs().sum() > 0 for t in w)


def test_cpu_uses_the_loop_and_bad_sizes_are_refused() -> None:
    x, weights, biases = _inputs([2, 3], k=8, m=8)
    assert grouped_linear_path(x.float(), weights) == "loop"
    with pytest.raises(ValueError, match=r"sizes \[2, 2\]"):
        grouped_linear(x, weights, biases, [2, 2])
