"""Single-process checks of the tensor/pipeline plumbing: shard layouts, stage cuts, config refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.parallel.linear import column_linear, row_linear
from hybrid_pretrain.parallel.pipeline import block_bounds, lm_name
from hybrid_pretrain.parallel.tensor import merge_shards, shard
from hybrid_pretrain.training.config import load_config


class _Param:
    """Stands in for a sharded parameter: only megatron's layout attributes matter to shard()."""

    def __init__(self, dim: int, stride: int) -> None:
        self.tensor_model_parallel, self.partition_dim, self.partition_stride = True, dim, stride


@pytest.mark.parametrize("tp,dim,stride", [(2, 0, 1), (2, 1, 2), (4, 1, 2), (4, 0, 3)])
def test_shard_and_merge_are_inverse(tp, dim, stride):
    full = torch.randn(24, 48)
    param = _Param(dim, stride)
    parts = [shard(full, param, rank=r, size=tp) for r in range(tp)]
    assert all(p.shape[dim] == full.shape[dim] // tp for p in parts)
    assert torch.equal(merge_shards(parts, dim, stride), full)


def test_strided_shard_holds_h3_heads_of_the_rank():
    # H3 output channel j * H + h (head_dim d = 2, H = 4): rank 0 of 2 keeps heads 0-1 for both j.
    full = torch.arange(8.0).view(1, 8)  # column c = channel c
    local = shard(full, _Param(1, 2), rank=0, size=2)
    assert local.tolist() == [[0.0, 1.0, 4.0, 5.0]]


def test_replicated_parameter_is_not_sliced():
    full = torch.randn(5)
    assert shard(full, nn.Parameter(full.clone()), rank=1, size=2) is full


def test_tp1_projections_are_plain_linear():
    assert type(column_linear(4, 8)) is nn.Linear and type(row_linear(8, 4, stride=2)) is nn.Linear


@pytest.mark.parametrize("layers,pp,bounds", [("HH|AH", 2, [0, 2, 4]), ("H|HAH", 2, [0, 1, 4]),
                                              ("HHAH", 2, [0, 2, 4]), ("HHAHHA", 3, [0, 2, 4, 6])])
def test_stage_bounds_from_cuts_or_even_split(layers, pp, bounds):
    assert block_bounds(ModelConfig(layers=layers), pp) == bounds


def test_pipeline_names_map_to_language_model_names():
    assert lm_name("tied_modules.embed.embedding.weight", 4) == "embedding.weight"
    assert lm_name("1.mixer.q_proj.weight", 4) == "blocks.0.mixer.q_proj.weight"
    assert lm_name("4.norm2.bias", 4) == "blocks.3.norm2.bias"
    assert lm_name("5.norm.weight", 4) == "norm.weight"
    assert lm_name("6.lm_head.weight", 4) == "lm_head.weight"
    # ZeRO-2 pipelines (parallel.one_f_one_b) save the stage inside a plain engine's module
    assert lm_name("pipe.tied_modules.embed.embedding.weight", 4) == "embedding.weight"
    assert lm_name("pipe.2.mixer.q_proj.weight", 4) == "blocks.1.mixer.q_proj.weight"


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tensor=3"], "model.n_heads (4) must be divisible by parallel.tensor (3)"),
    (["parallel.pipeline=2", "train.zero_stage=3"], "ZeRO-3 would gather every stage's weights"),
    (["parallel.pipeline=2", "train.zero_stage=0"], "would clip by a wrong gradient norm"),
    (["parallel.pipeline=3", "model.layers=HH|AH"], "has 2 stages"),
    (["parallel.tensor=2", "model.layers=HSAH"], "the mixer 's4d'"),
    (["parallel.tensor=2", "model.vocab_size=1001"], "model.vocab_size (1001)"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
])
def test_config_refuses_unsupported_layouts_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/debug_hybrid.yaml", overrides)


def test_supported_layouts_validate():
    for overrides in (["parallel.tensor=2", "parallel.pipeline=2"], ["parallel.pipeline=2", "model.layers=HH|AH"],
                      ["parallel.activation_checkpointing=true"]):
        load_config("configs/debug_hybrid.yaml", overrides)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, layers="HA", h3_d_state=8, max_seq_len=16)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(cfg)
        model.checkpoint_activations = checkpointing
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(grads[0][0], grads[1][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=0, atol=0, msg=name)


def test_memory_estimate_divides_weights_by_tensor_and_pipeline():
    from hybrid_pretrain.training.config import TrainConfig
    from hybrid_pretrain.training.memory import estimate_memory

    m = ModelConfig(d_model=1024, n_heads=16, layers="HHAH" * 4)
    one = estimate_memory(300e6, m, TrainConfig(zero_stage=1), 1024, 32000, 1, "bf16")
    split = estimate_memory(300e6, m, TrainConfig(zero_stage=1), 1024, 32000, 1, "bf16", tp_size=2, pp_size=2)
    assert split["weights"] == pytest.approx(one["weights"] / 4)
    assert split["activations"] < one["activations"]


@pytest.mark.parametrize("name,tensor,pipeline", [("debug_hybrid_tp2", 2, 1), ("debug_hybrid_pp2", 1, 2)])
def test_debug_configs_validate_with_their_layouts(name, tensor, pipeline):
    cfg = load_config(f"configs/{name}.yaml")
    assert (cfg.parallel.tensor, cfg.parallel.pipeline) == (tensor, pipeline)
    assert cfg.parallel.check_world(2) == 1
    assert block_bounds(cfg.model, pipeline)[-1] == 4
