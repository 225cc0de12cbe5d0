"""training/init_from.py: a consolidated checkpoint's weights land exactly in a freshly built model at any layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.tests.fake_runs import fake_zero0_run
from hybrid_pretrain.training import init_from as init
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.weights import load_consolidated, load_run, save_consolidated


def _consolidated(tmp_path, layers: str = "HA", tie: bool = True):
    model = fake_zero0_run(tmp_path / "run", layers, tie)
    save_consolidated(load_run(tmp_path / "run"), tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


@pytest.mark.parametrize("tie", [True, False])
def test_init_from_equals_the_consolidated_weights_exactly(tmp_path, tie: bool) -> None:
    saved, ckpt = _consolidated(tmp_path, "HSA", tie)
    torch.manual_seed(123)  # different initial weights than the checkpoint's
    fresh = LanguageModel(saved.cfg)
    assert not torch.equal(fresh.embedding.weight, saved.embedding.weight)
    init.init_from(fresh, ckpt, dataclasses.replace(saved.cfg, dropout=0.1))  # training-only fields may differ
    expected = saved.state_dict()
    assert fresh.state_dict().keys() == expected.keys()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids), saved(ids), rtol=0, atol=0)


def test_model_shape_mismatch_names_the_field(tmp_path) -> None:
    saved, ckpt = _consolidated(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.d_model is 32 in the checkpoint but 64"):
        init.init_from(LanguageModel(saved.cfg), ckpt, dataclasses.replace(saved.cfg, d_model=64))
    with pytest.raises(ConfigError, match=r"model\.layers is 'HA' in the checkpoint but 'HH'"):
        init.check_model_config(saved.cfg, dataclasses.replace(saved.cfg, layers="HH"), str(ckpt))


def test_tensor_mismatches_name_the_first_tensor(tmp_path) -> None:
    saved, ckpt = _consolidated(tmp_path)
    state = load_consolidated(ckpt).state_dict
    bad = dict(state, **{"norm.weight": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"tensor 'norm.weight' has shape \(5,\) in the checkpoint"):
        init.load_into(LanguageModel(saved.cfg), bad, "ckpt")
    with pytest.raises(CheckpointError, match="no tensor 'norm.weight'"):
        init.load_into(LanguageModel(saved.cfg), {k: v for k, v in state.items() if k != "norm.weight"}, "ckpt")
    with pytest.raises(CheckpointError, match="checkpoint tensor 'extra.bias' has no place"):
        init.load_into(LanguageModel(saved.cfg), dict(state, **{"extra.bias": torch.zeros(1)}), "ckpt")


def test_expert_parallel_rank_keeps_only_its_experts(tmp_path, monkeypatch) -> None:
    from hybrid_pretrain.models.config import ModelConfig
    from hybrid_pretrain.parallel import expert

    cfg = ModelConfig(vocab_size=64, d_model=16, n_heads=2, layers="AA", ffn="DE", num_experts=4, min_capacity=2)
    torch.manual_seed(0)
    full = LanguageModel(cfg).state_dict()
    # Rank 1 of an EP=2 group, without a process group: the container's group is only used to find the rank.
    monkeypatch.setattr(expert, "expert_parallel_group", lambda ep_size: None)
    monkeypatch.setattr(init, "_expert_rank", lambda container: 1)
    torch.manual_seed(1)
    layer = LanguageModel(cfg)
    model = expert.parallelize_experts(layer, 1)  # EP=1 containers: the same names, rank mapping via _expert_rank
    for m in model.modules():  # pretend each container holds 2 of the 4 experts, like an EP=2 rank
        if isinstance(m, expert._container_class()):
            m.num_local_experts = 2
            m.deepspeed_moe.experts.deepspeed_experts = m.deepspeed_moe.experts.deepspeed_experts[:2]
    init.load_into(model, full, "ckpt")
    local = model.state_dict()
    prefix = "blocks.1.ffn.experts.deepspeed_moe.experts.deepspeed_experts"
    assert torch.equal(local[f"{prefix}.0.w_in"], full["blocks.1.ffn.experts.mlps.2.w_in"])
    assert torch.equal(local[f"{prefix}.1.b_out"], full["blocks.1.ffn.experts.mlps.3.b_out"])
    assert f"{prefix}.2.w_in" not in local
    assert torch.equal(local["blocks.1.ffn.router.weight"], full["blocks.1.ffn.router.weight"])


def test_prepare_config_adopts_the_checkpoint_tokenizer_and_vocabulary(tmp_path) -> None:
    from hybrid_pretrain.training.config import load_config

    _, ckpt = _consolidated(tmp_path)
    cfg = load_config(None, [f"run_dir={tmp_path / 'new'}"])
    with pytest.raises(ConfigError, match="has no tokenizer.model; set data.tokenizer"):
        init.prepare_config(cfg, ckpt)
    (ckpt / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"model\.d_model is 32 in the checkpoint but 256 in this run"):
        init.prepare_config(cfg, ckpt)  # before any data work
    cfg = load_config(None, [f"run_dir={tmp_path / 'new'}", "model.layers=HA", "model.d_model=32", "model.n_heads=2",
                             "model.h3_d_state=8"])
    init.prepare_config(cfg, ckpt)
    assert cfg.data.tokenizer == str(ckpt / "tokenizer.model") and cfg.model.vocab_size == 64
