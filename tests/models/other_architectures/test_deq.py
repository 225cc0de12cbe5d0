"""DEQ: the solver reaches a fixed point, the implicit gradient matches finite differences, activation memory
does not grow with solver iterations, the model is causal and trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.deq import DEQLanguageModel, anderson
from hybrid_pretrain.tests.models.other_architectures.fixed_batch import fixed_batch_losses


def deq(make_cfg, **deq_options) -> DEQLanguageModel:
    return DEQLanguageModel(make_cfg(arch="deq", layers="A", options={"deq": deq_options}))


def test_anderson_solves_a_contraction() -> None:
    A = torch.randn(3, 6, 6, dtype=torch.float64) * 0.15
    b = torch.randn(3, 6, dtype=torch.float64)
    b[1] = 0  # a row already at its fixed point (e.g. a position without loss in the adjoint) stays finite
    f = lambda z: torch.einsum("nij,nj->ni", A, z) + b  # noqa: E731
    z, info = anderson(f, torch.zeros(3, 6, dtype=torch.float64), max_iter=50, tol=1e-12)
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - A, b)
    torch.testing.assert_close(z, exact, rtol=1e-9, atol=1e-9)
    assert info.residual <= 1e-12 and info.iterations < 50


def test_forward_reaches_fixed_point(make_cfg) -> None:
    model = deq(make_cfg, forward_tol=1e-5, forward_max_iter=60)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        x = model.embedding(ids)
        z = model.equilibrium(x)  # one f step past the solver's iterate
        fz = model.f(z, x)
    assert model.forward_info.residual <= 1e-5 and model.forward_info.iterations < 60
    assert ((fz - z).norm() / fz.norm()).item() < 1e-5  # z is f(iterate): one step further


def loss64(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The model's loss without its fp32 cast, so differences of 1e-6 perturbations stay exact enough."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


def test_implicit_gradient_matches_finite_differences(make_cfg) -> None:
    model = deq(make_cfg, forward_tol=1e-13, forward_max_iter=100, backward_tol=1e-13, backward_max_iter=100).double()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    model(ids, labels=labels).backward()
    assert model.forward_info.residual <= 1e-13 and model.backward_info.residual <= 1e-13
    implicit = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()  # reference 1: backpropagate through 80 plain iterations (the map contracts ~3x per step)
    x = model.embedding(ids)
    z = torch.zeros_like(x)
    for _ in range(80):
        z = model.f(z, x)
    F.cross_entropy(F.linear(model.norm(z), model.embedding.weight).flatten(0, 1), labels.flatten()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(implicit[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)

    checked = 0  # reference 2: central differences at each matrix's largest-gradient entry
    for name, p in model.named_parameters():
        if p.dim() != 2 or not name.startswith("block."):
            continue
        idx = divmod(int(implicit[name].abs().argmax()), p.shape[1])
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + 1e-6
            up = loss64(model(ids), labels)
            p[idx] = orig - 1e-6
            down = loss64(model(ids), labels)
            p[idx] = orig
        assert implicit[name][idx].item() == pytest.approx((up - down) / 2e-6, rel=1e-5), name
        checked += 1
    assert checked == 4


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_activation_memory_constant_in_depth(make_cfg) -> None:
    ids = torch.randint(0, 64, (2, 16))
    implicit = {}
    for iters in (4, 16):
        model = deq(make_cfg, forward_tol=0.0, forward_max_iter=iters)
        implicit[iters] = saved_bytes(lambda m=model: m(ids, labels=ids))
        assert model.forward_info.iterations == iters
    assert implicit[4] == implicit[16]

    def unrolled(m: DEQLanguageModel, iters: int) -> None:  # backprop through the solver instead: grows
        x, z = m.embedding(ids), torch.zeros(2, 16, 32)
        for _ in range(iters):
            z = m.f(z, x)

    assert saved_bytes(lambda: unrolled(model, 16)) > 3 * saved_bytes(lambda: unrolled(model, 4))


@torch.no_grad()
def test_causal_for_a_fixed_iteration_count(make_cfg) -> None:
    model = deq(make_cfg, forward_tol=0.0, forward_max_iter=12)
    ids = torch.randint(0, 64, (2, 14))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 64
    torch.testing.assert_close(model(changed)[:, :9], model(ids)[:, :9], rtol=1e-5, atol=1e-5)


def test_config_checks(make_cfg) -> None:
    with pytest.raises(ConfigError, match="one symbol"):
        DEQLanguageModel(make_cfg(arch="deq", layers="AA"))
    with pytest.raises(ConfigError, match="deq.anderson_m"):
        deq(make_cfg, anderson_m=1)


@pytest.mark.slow
def test_trains() -> None:
    losses = fixed_batch_losses("configs/debug_deq.yaml", overrides=("model.options.deq.forward_max_iter=10",
                                                                      "model.options.deq.backward_max_iter=10"))
    assert losses[-1] < 0.6 * losses[0], losses
