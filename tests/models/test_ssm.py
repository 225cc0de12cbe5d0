"""H3's shift and diagonal SSMs: convolution kernel == naive recurrence, S4D-Lin init, optimizer hints."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_pretrain.kernels.ssm_memory import quadratic
from hybrid_pretrain.models.mixers.h3 import H3
from hybrid_pretrain.models.mixers.ssm import SSM_OPTIM, DiagonalSSM, ShiftSSM


def run_recurrence(ssm: ShiftSSM | DiagonalSSM, u: torch.Tensor) -> torch.Tensor:
    """u: (B, H, L) -> y: (B, H, L), one `step` per position."""
    B, _, L = u.shape
    state = ssm.allocate_state(B) if isinstance(ssm, ShiftSSM) else ssm.allocate_state((B,))
    ys = []
    for t in range(L):
        y_t, state = ssm.step(u[..., t], state)
        ys.append(y_t)
    return torch.stack(ys, dim=-1)


@pytest.mark.parametrize("L", [3, 8, 21])
def test_shift_kernel_is_C_A_power_B(L: int) -> None:
    """K[l] = C A^l B with A the N x N shift matrix and B = e1, built explicitly."""
    N = 8
    ssm = ShiftSSM(channels=3, d_state=N).double()
    A = torch.diag(torch.ones(N - 1, dtype=torch.float64), diagonal=-1)  # x -> (0, x_0, ..., x_{N-2})
    B = torch.zeros(N, dtype=torch.float64)
    B[0] = 1.0
    expected = torch.stack([ssm.C.detach() @ torch.linalg.matrix_power(A, n) @ B for n in range(L)], dim=-1)
    torch.testing.assert_close(ssm.kernel(L).detach(), expected)


@pytest.mark.parametrize("ssm_cls", [ShiftSSM, DiagonalSSM])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("L", [5, 33])
def test_convolution_equals_recurrence(ssm_cls: type, dtype: torch.dtype, L: int) -> None:
    ssm = ssm_cls(6, 8).to(dtype)
    u = torch.randn(2, 6, L, dtype=dtype)
    with torch.no_grad():
        conv, rec = ssm(u), run_recurrence(ssm, u)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(conv, rec, rtol=tol, atol=tol * rec.abs().max().item())


def test_diagonal_kernel_is_impulse_response() -> None:
    """The kernel formula 2 Re(sum_n C_n dB_n exp(dtA_n l)) equals the recurrence's response to a unit impulse."""
    ssm = DiagonalSSM(4, 16).double()
    L = 50
    impulse = torch.zeros(1, 4, L, dtype=torch.float64)
    impulse[..., 0] = 1.0
    with torch.no_grad():
        response = run_recurrence(ssm, impulse)[0]
        response[:, 0] -= ssm.D  # the skip term is not part of the kernel
        torch.testing.assert_close(ssm.kernel(L), response, rtol=1e-10, atol=1e-12)


def test_diagonal_zoh_matches_matrix_exponential() -> None:
    """dA = exp(dt A), dB = A^-1 (exp(dt A) - I) B with B = 1: checked against torch.linalg.matrix_exp."""
    ssm = DiagonalSSM(2, 6).double()
    dtA, dB, _ = ssm.discretize()
    dt = ssm.log_dt.detach().exp()
    A = torch.complex(-ssm.log_A_real.detach().exp(), ssm.A_imag.detach())
    for h in range(2):
        expA = torch.linalg.matrix_exp(torch.diag(dt[h] * A[h]))
        torch.testing.assert_close(dtA.exp()[h].detach(), torch.diagonal(expA))
        expected_dB = torch.linalg.solve(torch.diag(A[h]), (expA - torch.eye(3)) @ torch.ones(3, dtype=A.dtype))
        torch.testing.assert_close(dB[h].detach(), expected_dB)


def test_s4d_lin_init() -> None:
    ssm = DiagonalSSM(16, 64)
    A_real = -ssm.log_A_real.detach().exp()
    torch.testing.assert_close(A_real, torch.full((16, 32), -0.5))
    torch.testing.assert_close(ssm.A_imag.detach(), (math.pi * torch.arange(32.0)).expand(16, 32))
    dt = ssm.log_dt.detach().exp()
    assert dt.min() >= 1e-3 - 1e-9 and dt.max() <= 1e-1 + 1e-9
    assert ssm.C.shape == (16, 32, 2)


def test_optimizer_hints_on_A_and_dt_only() -> None:
    ssm = DiagonalSSM(4, 8)
    for p in (ssm.log_dt, ssm.log_A_real, ssm.A_imag):
        assert p._optim == SSM_OPTIM == {"weight_decay": 0.0, "lr": 1e-3}
    for p in (ssm.C, ssm.D, *ShiftSSM(4, 8).parameters()):
        assert not hasattr(p, "_optim")


def test_gradients_reach_every_parameter() -> None:
    for ssm in (ShiftSSM(3, 4), DiagonalSSM(3, 4)):
        ssm(torch.randn(2, 3, 9)).square().sum().backward()
        for name, p in ssm.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("ssm_cls", [ShiftSSM, DiagonalSSM])
def test_step_constants_follow_in_place_weight_updates(ssm_cls: type) -> None:
    """Decoding reuses what depends on the weights only while they are unchanged (e.g. across an optimizer step)."""
    ssm = ssm_cls(4, 8)
    u = torch.randn(2, 4, 6)
    with torch.no_grad():
        before = run_recurrence(ssm, u)
        for p in ssm.parameters():
            p.add_(0.1 * torch.randn_like(p))
        after = run_recurrence(ssm, u)
        torch.testing.assert_close(after, ssm(u), rtol=1e-4, atol=1e-5)  # the recurrence saw the new weights
    assert not torch.allclose(before, after)


def test_step_is_differentiable_and_not_cached_under_autograd() -> None:
    ssm = DiagonalSSM(3, 8)
    with torch.no_grad():
        run_recurrence(ssm, torch.randn(1, 3, 2))  # fills the no-grad cache
    run_recurrence(ssm, torch.randn(2, 3, 5)).square().sum().backward()
    for name, p in ssm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_inference_cache_gives_the_autograd_results_and_follows_the_weights() -> None:
    """Without autograd the kernel (the longest asked, sliced) and the state tables are kept; the outputs
    equal the ones computed fresh, also after a shorter length, a weight update, or train()."""
    torch.manual_seed(0)
    ssm = DiagonalSSM(6, 16).eval()

    def fresh(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            return ssm(u).detach(), ssm.state_after(u).detach()

    for L in (300, 120, 300, 77):  # the 120 and 77 are prefixes of the kept 300-step kernel
        u = torch.randn(3, 6, L)
        with torch.no_grad():
            y, state = ssm(u), ssm.state_after(u)
        y_ref, state_ref = fresh(u)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
    assert ssm.__dict__["_inference"][1]["kernel"].shape[-1] == 300
    assert len(ssm.__dict__["_inference"][1]["tables"]) <= DiagonalSSM.KEPT_TABLES
    with torch.no_grad():
        ssm.log_dt.add_(0.5)  # an optimizer step: the kept kernel must not survive it
        y = ssm(u)
    torch.testing.assert_close(y, fresh(u)[0], rtol=1e-5, atol=1e-5)
    ssm.train()
    assert "_inference" not in ssm.__dict__  # training does not carry evaluation's tensors


def test_kept_tables_refuse_autograd() -> None:
    from hybrid_pretrain.kernels.vandermonde import transpose_tables, vandermonde_transpose

    dtA = DiagonalSSM(4, 8).discretize()[0]
    g = torch.randn(2, 4, 50, requires_grad=True)
    with pytest.raises(ValueError, match="for inference"):
        vandermonde_transpose(g, dtA, tables=transpose_tables(dtA.detach(), 50, 2))


def test_h3_inference_reads_the_kernel_from_the_ssm_cache(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without autograd a multi-head H3 layer builds its SSM kernel once, not on every forward."""
    torch.manual_seed(0)
    layer = H3(make_cfg(h3_head_dim=8), layer_idx=0).eval()
    x = torch.randn(2, 40, 32)
    with torch.enable_grad():
        expected = layer(x).detach()
    built = []
    monkeypatch.setattr(quadratic, "ssm_kernel", lambda *a: built.append(a) or pytest.fail("kernel rebuilt"))
    with torch.no_grad():
        layer(x)  # the first call fills DiagonalSSM's inference cache (outside the patched module)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not built
