"""S5: HiPPO-N init, scan == naive full-state recurrence, causal, step == forward, bidirectional."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers import build_mixer
from hybrid_pretrain.models.mixers.s5 import S5, hippo_n
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.tests.models.mixer_checks import assert_step_and_prefill_match


def _s5(make_cfg, **options) -> S5:
    return S5(make_cfg(layers="55", h3_d_state=8, options={"s5": options} if options else {}), 0).double().eval()


def naive_s5(m: S5, x: torch.Tensor) -> torch.Tensor:
    """The full P-dim recurrence, both conjugate halves kept: x_k = Lambda_bar x_k-1 + B_bar u_k, y = Re(C x)."""
    Lambda_bar, B_bar, C = m.discretize()
    lam, Bf = torch.cat([Lambda_bar, Lambda_bar.conj()]), torch.cat([B_bar, B_bar.conj()])  # (P,), (P, H)
    Cf = [torch.cat([c, c.conj()], dim=-1) for c in C]  # (H, P) per direction
    u = x.to(Bf.dtype)
    L = x.shape[1]
    fwd, back = [None] * L, [None] * L
    s = torch.zeros(x.shape[0], lam.shape[0], dtype=lam.dtype)
    for k in range(L):
        s = lam * s + u[:, k] @ Bf.T
        fwd[k] = (s @ Cf[0].T).real
    s = torch.zeros_like(s)
    for k in reversed(range(L)):
        s = lam * s + u[:, k] @ Bf.T
        back[k] = (s @ Cf[-1].T).real
    y = torch.stack(fwd, 1) + (torch.stack(back, 1) if m.bidirectional else 0)
    return m._readout(y, x)


def test_symbol_registry_and_options(make_cfg) -> None:
    assert parse_pattern("5A").layers[0].mixer == "s5"
    assert isinstance(build_mixer("s5", make_cfg(), 0), S5)
    assert isinstance(LanguageModel(make_cfg(layers="5A")).blocks[0].mixer, S5)
    with pytest.raises(ConfigError, match="blocks"):
        S5(make_cfg(h3_d_state=8, options={"s5": {"blocks": 3}}), 0)


def test_hippo_n_is_diagonalised_normal_part() -> None:
    Lambda, V = hippo_n(8)
    torch.testing.assert_close(Lambda.real, torch.full((8,), -0.5, dtype=torch.float64))
    torch.testing.assert_close(V @ V.conj().T, torch.eye(8, dtype=torch.complex128))  # unitary: S is normal
    q = torch.arange(8, dtype=torch.float64)
    p = torch.sqrt(1 + 2 * q)
    S = -(torch.tril(p[:, None] * p[None, :]) - torch.diag(q)) + torch.sqrt(q + 0.5)[:, None] * torch.sqrt(q + 0.5)
    torch.testing.assert_close(V @ torch.diag(Lambda) @ V.conj().T, S.to(torch.complex128))


@pytest.mark.parametrize("options", [{}, {"blocks": 2}, {"bidirectional": True}])
@torch.no_grad()
def test_scan_equals_naive_recurrence(make_cfg, options: dict) -> None:
    m = _s5(make_cfg, **options)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), naive_s5(m, x))


@torch.no_grad()
def test_causal_step_and_prefill_equal_forward(make_cfg) -> None:
    m = _s5(make_cfg)
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    y = m(x)
    changed = x.clone()
    changed[:, 9:] += 1.0
    torch.testing.assert_close(m(changed)[:, :9], y[:, :9])
    assert_step_and_prefill_match(m, x, y, "ssm")


@torch.no_grad()
def test_bidirectional_reads_the_future_and_cannot_step(make_cfg) -> None:
    m = _s5(make_cfg, bidirectional=True)
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, 9:] += 1.0
    assert (m(changed)[:, :9] - m(x)[:, :9]).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="bidirectional"):
        m.allocate_state(1, 12)


def test_meta_build_then_materialise_keeps_hints(make_cfg) -> None:
    with torch.device("meta"):
        model = LanguageModel(make_cfg(layers="5A"))
    model.to_empty(device="cpu")
    model.reset_parameters()
    m = model.blocks[0].mixer
    assert m.log_step._optim["weight_decay"] == 0.0 and torch.isfinite(m.B).all()
    assert torch.isfinite(model(torch.randint(0, 64, (1, 8)))).all()
