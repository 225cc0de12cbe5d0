"""models/packed_linear.py: decoding steps through MKL-packed weights give F.linear's results, and only there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybrid_pretrain.models.generation import DecodingState, generate
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.packed_linear import PackedLinears, packing_helps

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL's packed GEMM")


@pytest.mark.parametrize("tied", [True, False])
@torch.no_grad()
def test_packed_steps_match_linear_steps_and_are_undone(make_cfg, tied: bool) -> None:
    model = LanguageModel(make_cfg(layers="HAH", tie_embeddings=tied)).eval()
    ids = torch.randint(0, 64, (4, 9))
    plain, packed_state = model.allocate_state(4, 16), model.allocate_state(4, 16)
    packed = PackedLinears(model, rows=4)
    assert len(packed.linears) == sum(type(m) is nn.Linear for m in model.modules()) and (packed.head is None) != tied
    for t in range(ids.shape[1]):
        expected = model.step(ids[:, t], plain)
        with packed.active():
            got = model.step(ids[:, t], packed_state)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())  # nn.Linear.forward again
    assert (model.lm_head is None) == tied  # the packed head was only lent to the tied model
    assert any(k.startswith("lm_head") for k in model.state_dict()) != tied


@torch.no_grad()
def test_other_row_counts_and_autograd_take_f_linear_exactly(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="HA")).eval()
    layer = next(m for m in model.modules() if type(m) is nn.Linear)
    x3, x4 = torch.randn(3, layer.in_features), torch.randn(4, layer.in_features)
    packed = PackedLinears(model, rows=4)
    with packed.active():
        assert torch.equal(layer(x3), nn.functional.linear(x3, layer.weight, layer.bias))  # 3 rows: not packed
        with torch.enable_grad():
            y = layer(x4)
        assert y.requires_grad  # autograd sees F.linear
        torch.testing.assert_close(layer(x4), nn.functional.linear(x4, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_generation_packs_equal_length_batches_only(make_cfg) -> None:
    model = LanguageModel(make_cfg(layers="HAH")).eval()
    assert packing_helps(model, 4) and not packing_helps(model, 1)
    assert DecodingState(model, torch.tensor([5, 5, 5]), 12).packed is not None
    assert DecodingState(model, torch.tensor([5, 4, 5]), 12).packed is None  # two groups of rows
    assert not packing_helps(model.to(torch.float64), 4)
    model.float()
    prompts = torch.randint(0, 64, (4, 6))
    together = generate(model, prompts, 8)  # packed steps
    alone = torch.cat([generate(model, prompts[i: i + 1], 8) for i in range(4)])  # one row: F.linear
    assert torch.equal(together, alone)


def test_memory_check_counts_the_packed_head(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tied head is packed too, so its copy counts against the free memory (not only the nn.Linear weights)."""
    model = LanguageModel(make_cfg(layers="HA", tie_embeddings=True)).eval()
    linear_bytes = sum(4 * m.weight.numel() for m in model.modules() if type(m) is nn.Linear)
    head_bytes = 4 * model.embedding.weight.numel()

    class Free:
        available = 2 * linear_bytes + head_bytes  # enough for the linears' copies, not with the head's

    monkeypatch.setattr("hybrid_pretrain.models.packed_linear.psutil.virtual_memory", lambda: Free)
    assert not packing_helps(model, 4)
    Free.available = 2 * (linear_bytes + head_bytes) + 1
    assert packing_helps(model, 4)
