"""Per-tensor-rank dropout streams (parallel/rng.py) without ranks: the tensor rank is passed in, as
parallel.build does from megatron-core's groups. The multi-rank check (replicated weights stay equal
across tensor ranks with dropout on, exact resume) is in test_tensor_pipeline.py."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.lm import LanguageModel
from hybrid_pretrain.models.mixers.attention import Attention
from hybrid_pretrain.parallel.rng import SplitDropout, split_dropout_regions, split_rng


def _draw_under(tp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside the split region, on the default stream after it), from the same starting state."""
    torch.manual_seed(0)
    with split_rng(tp_rank, torch.device("cpu")):
        inside = torch.rand(8)
    return inside, torch.rand(8)


def test_ranks_draw_their_own_masks_and_the_default_stream_stays_in_step():
    inside0, after0 = _draw_under(0)
    inside1, after1 = _draw_under(1)
    assert not torch.equal(inside0, inside1)  # split slices get independent masks
    assert torch.equal(after0, after1)  # replicated regions after it still agree across tensor ranks
    assert torch.equal(_draw_under(1)[0], inside1)  # and it is all a function of the default generator


def test_activation_checkpointing_replays_the_split_masks():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(16, 16), SplitDropout(0.5, tp_rank=1), nn.Linear(16, 16))
    x = torch.randn(4, 16)

    def grads(recompute: bool) -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(2)
        out = checkpoint(net, x, use_reentrant=False) if recompute else net(x)
        out.square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    for plain, recomputed in zip(grads(False), grads(True)):
        assert torch.equal(plain, recomputed)


def test_split_regions_are_attention_and_under_sequence_parallelism_every_dropout():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, layers="HA", h3_d_state=8, max_seq_len=16, dropout=0.1)

    def split_modules(sequence_parallel: bool) -> tuple[set[str], set[str]]:
        torch.manual_seed(0)
        model = split_dropout_regions(LanguageModel(cfg), tp_rank=1, sequence_parallel=sequence_parallel)
        wrapped = {n for n, m in model.named_modules() if isinstance(m, Attention) and "forward" in vars(m)}
        return wrapped, {n for n, m in model.named_modules() if isinstance(m, SplitDropout)}

    assert split_modules(False) == ({"blocks.1.mixer"}, set())
    attention, dropouts = split_modules(True)
    assert attention == {"blocks.1.mixer"} and dropouts == {"drop", "blocks.0.drop", "blocks.1.drop"}
