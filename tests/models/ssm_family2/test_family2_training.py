"""Each debug config's model (configs/debug_{s5,dlr,mega}.yaml: its layer pattern and options, narrowed to
d_model 64 and a 256-token vocabulary to stay fast) trains: loss on a fixed batch falls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybrid_pretrain.models.architectures import build_arch
from hybrid_pretrain.tests.procs import REPO
from hybrid_pretrain.training.config import load_config
from hybrid_pretrain.training.optimizer import param_groups


@pytest.mark.parametrize("name", ["s5", "dlr", "mega"])
def test_debug_config_model_fits_a_fixed_batch(name: str) -> None:
    run = load_config(str(REPO / "configs" / f"debug_{name}.yaml"), ["model.d_model=64", "data.vocab_size=256"])
    cfg = dataclasses.replace(run.model, vocab_size=run.data.vocab_size)
    torch.manual_seed(0)
    model = build_arch(cfg)
    ids = torch.randint(0, 256, (2, 33))
    opt = torch.optim.AdamW(param_groups(model, run.train.lr, 0.0), lr=run.train.lr)
    losses = []
    for _ in range(20):
        loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


@torch.no_grad()
def test_language_model_decodes_token_by_token(make_cfg) -> None:
    from hybrid_pretrain.models.generation import prefill
    from hybrid_pretrain.models.lm import LanguageModel

    cfg = make_cfg(layers="5rMA", options={"mega": {"chunk_size": 4}}, rotary_dim=8)
    model = LanguageModel(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 11))
    logits = model(ids)
    state = model.allocate_state(2, 11)
    stepped = torch.stack([model.step(ids[:, t], state) for t in range(11)], dim=1)
    torch.testing.assert_close(stepped, logits)
    state = model.allocate_state(2, 11)
    torch.testing.assert_close(prefill(model, ids[:, :7], state), logits[:, 6])  # each mixer's prefill
    torch.testing.assert_close(model.step(ids[:, 7], state), logits[:, 7])
