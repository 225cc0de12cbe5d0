"""DLR: FFT (Vandermonde) path == scan path == naive recurrence == step; causal; |Lambda| < 1."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers.dlr import DLR
from hybrid_pretrain.models.pattern import parse_pattern
from hybrid_pretrain.tests.models.mixer_checks import assert_step_and_prefill_match


def _dlr(make_cfg, mode: str) -> DLR:
    return DLR(make_cfg(layers="rr", h3_d_state=8, options={"dlr": {"mode": mode}}), 0).double().eval()


def naive_dlr(m: DLR, x: torch.Tensor) -> torch.Tensor:
    """x_k = Lambda x_k-1 + u_k per channel and mode, y = 2 Re(C x) + D u, one step at a time."""
    lam, C = m.log_lambda().exp(), m._C()  # (H, N/2)
    s = torch.zeros(x.shape[0], *lam.shape, dtype=lam.dtype)
    ys = []
    for k in range(x.shape[1]):
        s = lam * s + x[:, k, :, None]
        ys.append(2 * (C * s).sum(-1).real + m.D * x[:, k])
    return m._readout(torch.stack(ys, 1), x)


def test_symbol_registry_and_options(make_cfg) -> None:
    assert parse_pattern("rA").layers[0].mixer == "dlr"
    assert isinstance(LanguageModel(make_cfg(layers="rA")).blocks[0].mixer, DLR)
    with pytest.raises(ConfigError, match="mode"):
        DLR(make_cfg(options={"dlr": {"mode": "cuda"}}), 0)


@pytest.mark.parametrize("mode", ["fft", "scan"])
@torch.no_grad()
def test_paths_equal_naive_recurrence_and_step(make_cfg, mode: str) -> None:
    m = _dlr(make_cfg, mode)
    with torch.no_grad():  # spread |Lambda| so long and short memories both show
        m.log_nu.uniform_(-6, 0)
        m.theta.uniform_(-3, 3)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(y, naive_dlr(m, x))
    assert_step_and_prefill_match(m, x, y, "ssm")


@torch.no_grad()
def test_causal_stable_and_paths_drop_in(make_cfg) -> None:
    fft, scan = _dlr(make_cfg, "fft"), _dlr(make_cfg, "scan")
    scan.load_state_dict(fft.state_dict())  # same parameters, same keys
    x = torch.randn(1, 17, 32, dtype=torch.float64)
    torch.testing.assert_close(scan(x), fft(x))
    changed = x.clone()
    changed[:, 11:] -= 2.0
    torch.testing.assert_close(fft(changed)[:, :11], fft(x)[:, :11])
    assert (fft.log_lambda().exp().abs() < 1).all()
