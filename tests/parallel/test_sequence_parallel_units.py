"""Sequence parallelism's pieces: the rank-major layout, the collectives' forward and backward, the gathered
linear and the norm.

The whole model under sequence parallelism (TP=2 x DP=2 and TP=2 x PP=2) is checked against the
single-rank run in test_tensor_pipeline.py; these tests pin down the building blocks: single-process
where a world of one suffices, one small 2-rank gloo check of the collectives against full-sequence
references (slow: it starts processes).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.parallel import pipeline, sequence
from hybrid_pretrain.tests.parallel.sequence_parallel_ranks import two_rank_worker
from hybrid_pretrain.tests.procs import _free_port
from hybrid_pretrain.training.config import load_config


@pytest.fixture
def sp_flag():
    """Sequence parallelism switched on for the test, off afterwards."""
    sequence.set_enabled(True)
    yield
    sequence.set_enabled(False)


@pytest.fixture
def world_of_one():
    """A gloo process group of one rank (the collectives run for real, trivially)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("shape,dim", [((2, 12, 5), 1), ((12, 3), 0), ((2, 3, 8), 2)])
def test_rank_major_is_chunk_and_its_inverse_is_cat(shape, dim):
    x = torch.randn(shape)
    parts = sequence.rank_major(x, 4, dim)
    for r, chunk in enumerate(x.chunk(4, dim=dim)):
        assert torch.equal(parts[r], chunk)
    assert torch.equal(sequence.from_rank_major(parts, dim), x)


def test_rank_major_refuses_a_length_the_ranks_do_not_divide():
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 2"):
        sequence.rank_major(torch.zeros(2, 5, 3), 2, 1)


def test_flag_without_tensor_parallelism_builds_the_plain_model(sp_flag):
    """At TP=1 the switch changes nothing: same module types, same output bit for bit."""
    from hybrid_pretrain.models.config import ModelConfig
    from hybrid_pretrain.models.lm import LanguageModel

    assert not sequence.is_enabled()
    assert type(sequence.layer_norm(8, 1e-5)) is nn.LayerNorm
    cfg = ModelConfig(vocab_size=64, d_model=16, n_heads=2, layers="HA", h3_d_state=4, max_seq_len=8)
    torch.manual_seed(0)
    with_flag = LanguageModel(cfg)
    sequence.set_enabled(False)
    torch.manual_seed(0)
    without = LanguageModel(cfg)
    assert [type(m) for m in with_flag.modules()] == [type(m) for m in without.modules()]
    ids = torch.randint(0, 64, (2, 8))
    assert torch.equal(with_flag(ids, labels=ids), without(ids, labels=ids))
    assert pipeline.deepspeed_config(cfg) == {}  # the pipe keeps splitting activations over tensor ranks


def test_sequence_parallel_norm_matches_layer_norm_at_world_size_one(world_of_one, monkeypatch):
    monkeypatch.setattr(sequence, "tensor_parallel_group", lambda: world_of_one)
    torch.manual_seed(0)
    ref = nn.LayerNorm(6, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    sp = sequence.SequenceParallelLayerNorm(6, eps=1e-5)
    sp.load_state_dict(ref.state_dict())
    assert sp.state_dict().keys() == ref.state_dict().keys()
    x, g = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 4, 6)
    x2 = x.detach().clone().requires_grad_()
    ref(x).backward(g)
    out = sp(x2)
    assert torch.equal(out, ref(x.detach()))
    out.backward(g)
    for a, b in ((sp.weight.grad, ref.weight.grad), (sp.bias.grad, ref.bias.grad), (x2.grad, x.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_collectives_at_world_size_one_are_the_identity(world_of_one):
    x = torch.randn(2, 6, 3, requires_grad=True)
    y = sequence.reduce_scatter(sequence.gather(x, group=world_of_one), group=world_of_one)
    assert torch.equal(y, x)
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.sequence_parallel=true"], "needs parallel.tensor >= 2"),
    (["parallel.sequence_parallel=true", "data.seq_len=127"], "data.seq_len (127) must be divisible"),
    (["parallel.sequence_parallel=true", "model.ffn=DEDE"], "MoE layers"),
    (["parallel.sequence_parallel=true", "model.layers=HSAH"], "the mixer 's4d'"),
    (["parallel.sequence_parallel=true", "train.zero_stage=3"], "zero_stage=3"),
])
def test_config_refuses_sequence_parallel_where_it_cannot_run(overrides, message):
    base = ["parallel.tensor=2"] if "needs parallel.tensor" not in message else []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/debug_hybrid.yaml", [*base, *overrides])


def test_config_accepts_sequence_parallel_with_tensor_parallelism():
    cfg = load_config("configs/debug_hybrid_tp2.yaml", ["parallel.sequence_parallel=true"])
    assert cfg.parallel.sequence_parallel and cfg.parallel.tensor == 2


@pytest.mark.slow
def test_collectives_and_norm_on_two_ranks_match_the_whole_sequence():
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(two_rank_worker, args=(_free_port(),), nprocs=2, join=True)
