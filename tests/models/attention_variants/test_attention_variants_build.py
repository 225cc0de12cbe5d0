"""The four variants build from the registry on the meta device and materialise with to_empty + reset_parameters."""

from __future__ import annotations

import pytest
import torch

from hybrid_pretrain.models.architectures import ARCHS, build_arch
from hybrid_pretrain.models.mixers import MIXERS


@pytest.mark.parametrize("name", ["linear_attention", "bigbird", "block_recurrent"])
def test_registered_mixer_resolves(name: str) -> None:
    assert MIXERS.get(name).__module__ == f"hybrid_pretrain.models.mixers.{name}"


@pytest.mark.parametrize("arch,layers", [("lm", "LBRA"), ("perceiver_ar", "LBR")])
def test_meta_build_then_materialise(make_cfg, arch: str, layers: str) -> None:
    assert arch in ARCHS
    cfg = make_cfg(arch=arch, layers=layers, max_seq_len=128)
    with torch.device("meta"):
        model = build_arch(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.reset_parameters()
    ids = torch.randint(0, 64, (2, 40))
    loss = model(ids, labels=ids)
    assert torch.isfinite(loss) and 0.0 < loss.item() < 10.0
