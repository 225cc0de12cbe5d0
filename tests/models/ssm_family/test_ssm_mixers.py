"""S4, S4D, DSS and GSS as mixers: registry, causality, step == forward, loop references, bidirectional mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers import build_mixer
from hybrid_pretrain.models.mixers.dss import DSS
from hybrid_pretrain.models.mixers.gss import GSS
from hybrid_pretrain.models.mixers.s4 import S4
from hybrid_pretrain.models.mixers.s4d import S4D
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.models.ssm import reference
from hybrid_pretrain.models.ssm.cauchy import dplr_dense
from hybrid_pretrain.training.optimizer import param_groups

CAUSAL = [("s4", "4", S4, {}), ("s4d", "S", S4D, {"init": "legs"}), ("s4d", "S", S4D, {"dt_min": 0.01}),
          ("dss", "d", DSS, {}), ("gss", "g", GSS, {"expand": 2})]
BIDIRECTIONAL = ["s4", "s4d", "dss"]


def build(make_cfg, name: str, opts: dict, **cfg):
    return build_mixer(name, make_cfg(options={name: opts}, **cfg), 0)


@pytest.mark.parametrize(("name", "symbol", "cls", "opts"), CAUSAL)
def test_registered_under_symbol(make_cfg, name: str, symbol: str, cls: type, opts: dict) -> None:
    assert parse_pattern(f"A{symbol}").layers[1].mixer == name
    assert isinstance(build(make_cfg, name, opts), cls)
    model = LanguageModel(make_cfg(layers=symbol * 2, options={name: opts}))
    assert isinstance(model.blocks[1].mixer, cls)
    assert model(torch.randint(0, 64, (2, 10))).shape == (2, 10, 64)


@torch.no_grad()
@pytest.mark.parametrize(("name", "symbol", "cls", "opts"), CAUSAL)
def test_causal_and_step_equals_forward(make_cfg, name: str, symbol: str, cls: type, opts: dict) -> None:
    mixer = build(make_cfg, name, opts).double().eval()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    y = mixer(x)
    changed = x.clone()
    changed[:, 9:] += 1.0
    torch.testing.assert_close(mixer(changed)[:, :9], y[:, :9])
    assert not torch.allclose(mixer(changed)[:, 9:], y[:, 9:])
    state = mixer.allocate_state(2, 16)
    stepped = torch.stack([mixer.step(x[:, t], state) for t in range(16)], dim=1)
    torch.testing.assert_close(stepped, y)


@torch.no_grad()
@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_sees_the_future_and_refuses_step(make_cfg, name: str) -> None:
    mixer = build(make_cfg, name, {"bidirectional": True}).eval()
    x = torch.randn(2, 16, 32)
    changed = x.clone()
    changed[:, 9:] += 1.0
    assert not torch.allclose(mixer(changed)[:, :9], mixer(x)[:, :9])
    with pytest.raises(RuntimeError, match="bidirectional"):
        mixer.allocate_state(2, 16)
    with pytest.raises(RuntimeError, match="bidirectional"):
        mixer.step(x[:, 0], {})


def _readout(mixer, y: torch.Tensor) -> torch.Tensor:
    return mixer.out_proj(F.gelu(y.transpose(1, 2), approximate="tanh"))


@torch.no_grad()
def test_s4_cauchy_path_equals_dense_recurrence(make_cfg) -> None:
    """Forward (generating function + FFT) vs the dense bilinear DPLR matrix run one step at a time."""
    mixer = build(make_cfg, "s4", {}).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    lam, P, B, C, dt = mixer.ssm.system()
    dA, dB = reference.discretize_bilinear(dplr_dense(lam, P), B, dt)
    y = reference.recurrence(x.transpose(1, 2), dA, dB, C, mixer.D)  # (B, D, L)
    torch.testing.assert_close(mixer(x), _readout(mixer, y))


@torch.no_grad()
def test_s4d_vandermonde_path_equals_zoh_recurrence(make_cfg) -> None:
    mixer = build(make_cfg, "s4d", {"init": "legs"}).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    ssm = mixer.ssm
    lam = torch.complex(-ssm.log_A_real.exp(), ssm.A_imag)
    dA, dB = reference.discretize_zoh_diagonal(lam, ssm.log_dt.exp())
    C = torch.view_as_complex(ssm.C.contiguous())
    y = reference.recurrence(x.transpose(1, 2), dA, dB, C, ssm.D)
    torch.testing.assert_close(mixer(x), _readout(mixer, y))


@torch.no_grad()
def test_dss_kernel_path_equals_recurrence(make_cfg) -> None:
    mixer = build(make_cfg, "dss", {"kernel_len": 40}).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    lam, W, dt = mixer.ssm.system()
    P = (dt.unsqueeze(-1) * lam).unsqueeze(-1) * torch.arange(40, dtype=torch.float64)  # softmax over kernel_len
    c = W * torch.expm1(dt.unsqueeze(-1) * lam) / lam / P.exp().sum(-1)
    z = torch.exp(dt.unsqueeze(-1) * lam)
    y = reference.recurrence(x.transpose(1, 2), torch.diag_embed(z), torch.ones_like(z), c, mixer.D, scale=1.0)
    torch.testing.assert_close(mixer(x), _readout(mixer, y))
    with pytest.raises(ValueError, match="kernel_len"):
        mixer(torch.randn(1, 41, 32, dtype=torch.float64))


def test_s4d_defaults_keep_the_original_layer(make_cfg) -> None:
    torch.manual_seed(1)
    old = S4D(make_cfg(), 0)
    assert old.ssm_backward is None and old.ssm.A_imag[0, 1].item() == pytest.approx(torch.pi)
    legs = build(make_cfg, "s4d", {"init": "legs"})
    assert sorted(old.state_dict()) == sorted(legs.state_dict())
    assert not torch.allclose(old.ssm.A_imag, legs.ssm.A_imag)


@pytest.mark.parametrize(("name", "expected"), [("s4", 5), ("s4d", 3), ("dss", 3), ("gss", 3)])
def test_ssm_parameters_carry_optimizer_hints(make_cfg, name: str, expected: int) -> None:
    mixer = build(make_cfg, name, {})
    slow = [g for g in param_groups(mixer, lr=3e-3, weight_decay=0.1) if g["lr"] == 1e-3]
    assert len(slow) == 1 and slow[0]["weight_decay"] == 0.0 and len(slow[0]["params"]) == expected


@pytest.mark.parametrize(("name", "opts", "match"), [
    ("s4d", {"init": "inv"}, "init"), ("s4", {"d_state": 3}, "d_state"), ("dss", {"dt_min": 1.0}, "dt_min"),
    ("gss", {"expnd": 2}, "expand"),
])
def test_bad_options_name_the_field(make_cfg, name: str, opts: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(make_cfg, name, opts)


@pytest.mark.parametrize(("symbol", "name", "opts"), [("4", "s4", {}), ("S", "s4d", {"init": "legs"}),
                                                       ("d", "dss", {}), ("g", "gss", {})])
def test_meta_build_then_materialise(make_cfg, symbol: str, name: str, opts: dict) -> None:
    cfg = make_cfg(layers=symbol, options={name: opts})
    with torch.device("meta"):
        model = LanguageModel(cfg)
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))))
