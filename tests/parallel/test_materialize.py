"""One rank's model made alone (meta device, then parallel.materialize) equals its share of the single-rank model.

Single process, no process groups: expert-parallel ranks are picked with ``build_model(..., ep_rank=r)``.
Tensor and pipeline slices need megatron-core's and DeepSpeed's groups; the 4-rank equivalence tests
(test_tensor_pipeline.py, test_expert_composition.py) check them bit for bit against the single-rank
initial weights before training.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.ffn.moe import Expert
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.parallel import build
from hybrid_pretrain.parallel.expert import single_rank_expert_name
from hybrid_pretrain.parallel.materialize import materialize
from hybrid_pretrain.tests.procs import REPO
from hybrid_pretrain.training.config import ParallelConfig

SEED = 5


def config(name: str, **changes) -> ModelConfig:
    section = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"]
    return ModelConfig(**{**section, "vocab_size": 96, "d_model": 32, "h3_d_state": 8, "max_seq_len": 32, **changes})


def single_rank(cfg: ModelConfig) -> LanguageModel:
    torch.manual_seed(SEED)
    return LanguageModel(cfg)


@pytest.mark.parametrize("name", ["debug_hybrid", "debug_glam"])
def test_single_rank_build_is_the_model_constructed_from_the_seed(name):
    cfg = config(name)
    want = dict(single_rank(cfg).named_parameters())
    got = build.build_model(cfg, ParallelConfig(), SEED, dp_size=1)  # experts in DeepSpeed's container at EP=1
    named = {single_rank_expert_name(key): p for key, p in got.named_parameters()}
    assert named.keys() == want.keys()
    for key, p in named.items():
        assert torch.equal(p, want[key]), key
        assert getattr(p, "_optim", None) == getattr(want[key], "_optim", None), key  # optimizer hints survive


@pytest.mark.parametrize("name,experts,ep", [("debug_glam", 4, 2), ("debug_switch", 8, 4), ("debug_glam", 8, 4)])
def test_expert_parallel_rank_holds_its_slice_of_the_single_rank_model(name, experts, ep):
    cfg = config(name, num_experts=experts)
    want = single_rank(cfg).state_dict()
    n_local, seen = experts // ep, set()
    for rank in range(ep):
        model = build.build_model(cfg, ParallelConfig(expert=ep), SEED, dp_size=ep, ep_rank=rank)
        for name_, p in model.named_parameters():
            key = single_rank_expert_name(name_, rank, n_local)
            assert torch.equal(p, want[key]), f"rank {rank}: {name_}"
            if key != name_:  # an expert: DeepSpeed's flags (kept out of the data-parallel all-reduce) survive
                assert p.allreduce is False and p.group_name == f"ep_size_{ep}"
            seen.add(key)
    assert seen == set(want)  # the ranks together hold every parameter


def test_an_expert_parallel_rank_never_makes_the_whole_model(monkeypatch):
    # Every build_arch call happens on the meta device, and only this rank's experts get real values.
    cfg = config("debug_glam", num_experts=8)
    devices, made = [], []
    real_build_arch, real_reset = build.build_arch, Expert.reset_parameters

    def recording_build_arch(model_cfg):
        devices.append(torch.get_default_device().type)
        return real_build_arch(model_cfg)

    def recording_reset(expert):
        if not expert.w_in.is_meta:
            made.append(expert.w_in.numel())
        real_reset(expert)

    monkeypatch.setattr(build, "build_arch", recording_build_arch)
    monkeypatch.setattr(Expert, "reset_parameters", recording_reset)
    model = build.build_model(cfg, ParallelConfig(expert=4), SEED, dp_size=4, ep_rank=3)
    assert devices and set(devices) == {"meta"}
    moe_layers = cfg.ffn.count("E")
    assert len(made) == moe_layers * 8 // 4  # 2 experts per layer, none of the other ranks' 6
    local_experts = sum(".deepspeed_experts." in name for name, _ in model.named_parameters())
    assert local_experts == moe_layers * 2 * 4  # 4 tensors per expert


def test_a_parameter_without_a_single_rank_source_is_refused():
    with torch.device("meta"):
        model = single_rank(config("debug_hybrid"))
        reference = single_rank(config("debug_hybrid"))
    with pytest.raises(KeyError, match="no module 'blocks.0.extra.q_proj' in the single-rank model"):
        materialize(model, reference, reference.weight_init.module,
                    rename=lambda name: name.replace("blocks.0.mixer", "blocks.0.extra"))
