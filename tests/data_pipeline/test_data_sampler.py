"""RankBatches and eval_batches: disjoint ranks, full epochs, determinism and exact resume."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from hybrid_pretrain.data_pipeline.dataset import PackedSequences
from hybrid_pretrain.data_pipeline.errors import DataError
from hybrid_pretrain.data_pipeline.sampler import RankBatches, eval_batches


class Indexed(Dataset):
    """Sample i is a row of i's, so a batch shows which samples it holds."""

    def __init__(self, n: int, seq_len: int = 4) -> None:
        self.n, self.seq_len = n, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((self.seq_len + 1,), i, dtype=torch.long)


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def test_ranks_are_disjoint_and_cover_the_epoch() -> None:
    ds, b, world = Indexed(50), 4, 3
    ranks = [RankBatches(ds, b, r, world, seed=7) for r in range(world)]
    assert ranks[0].steps_per_epoch == 50 // (b * world) == 4
    seen = [[i for _ in range(4) for i in ids(next(it))] for it in ranks]
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == 48  # disjoint; ragged tail of 2 dropped
    global_order = [i for step in range(4) for r in range(world) for i in seen[r][step * b : (step + 1) * b]]
    assert global_order == ranks[0].permutation(0)[:48].tolist()  # rank r takes micro-batch r of each global batch
    assert all(it.state_dict() == {"epoch": 0, "step": 4} for it in ranks)
    next(ranks[0])
    assert ranks[0].state_dict() == {"epoch": 1, "step": 1}


def test_batches_are_deterministic_per_seed_and_reshuffled_per_epoch() -> None:
    ds = Indexed(40)
    a = [ids(x) for x in islice(RankBatches(ds, 5, seed=1), 16)]
    b = [ids(x) for x in islice(RankBatches(ds, 5, seed=1), 16)]
    c = [ids(x) for x in islice(RankBatches(ds, 5, seed=2), 16)]
    assert a == b and a != c
    epoch0, epoch1 = sum(a[:8], []), sum(a[8:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1


@pytest.mark.parametrize("stop", [0, 3, 4, 5, 13])
def test_resume_from_state_equals_uninterrupted_run(stop: int) -> None:
    ds = Indexed(37)
    full = [ids(x) for x in islice(RankBatches(ds, 3, 1, 3, seed=5), 20)]
    first = RankBatches(ds, 3, 1, 3, seed=5)
    head = [ids(x) for x in islice(first, stop)]
    state = dict(first.state_dict())  # what a checkpoint stores
    resumed = RankBatches(ds, 3, 1, 3, seed=5)
    resumed.load_state_dict(state)
    assert head + [ids(x) for x in islice(resumed, 20 - stop)] == full


def test_overfit_batches_repeat_the_first_ones_and_resume() -> None:
    """train.overfit_batches: the rank's first N batches of the normal order, over and over, resumable."""
    ds = Indexed(37)
    normal = [ids(x) for x in islice(RankBatches(ds, 3, 1, 3, seed=5), 2)]
    repeated = RankBatches(ds, 3, 1, 3, seed=5, repeat=2)
    head = [ids(x) for x in islice(repeated, 5)]
    assert head == normal + normal + normal[:1]
    resumed = RankBatches(ds, 3, 1, 3, seed=5, repeat=2)
    resumed.load_state_dict(dict(repeated.state_dict()))
    assert [ids(x) for x in islice(resumed, 3)] == [normal[1], normal[0], normal[1]]
    with pytest.raises(DataError, match="train.overfit_batches must be in \\[0, 4\\]"):
        RankBatches(ds, 3, 1, 3, seed=5, repeat=5)


def test_invalid_state_and_sizes_are_data_errors() -> None:
    it = RankBatches(Indexed(20), 4, seed=0)
    with pytest.raises(DataError, match="missing \\['step'\\]"):
        it.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="does not fit this dataset"):
        it.load_state_dict({"epoch": 0, "step": 99})
    with pytest.raises(DataError, match="fewer than one global batch of micro_batch_size \\* dp_size = 4 \\* 8"):
        RankBatches(Indexed(20), 4, 0, 8)
    with pytest.raises(DataError, match="rank 2 is outside a group of size 2"):
        RankBatches(Indexed(20), 4, 2, 2)


def test_eval_batches_are_fixed_disjoint_and_equal_in_number() -> None:
    ds = Indexed(30)
    per_rank = [[ids(x) for x in eval_batches(ds, 4, r, 2)] for r in range(2)]
    assert per_rank[0] == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    assert per_rank[1] == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23]]
    assert [ids(x) for x in eval_batches(ds, 4, 0, 2)] == per_rank[0]  # same every call
    assert len(list(eval_batches(ds, 4, 1, 2, num_batches=2))) == 2


def test_eval_batches_wrap_a_tiny_validation_set() -> None:
    per_rank = [[ids(x) for x in eval_batches(Indexed(3), 2, r, 4)] for r in range(4)]
    assert per_rank == [[[0, 1]], [[2, 0]], [[1, 2]], [[0, 1]]]  # every rank gets one full batch


def test_batches_from_packed_sequences(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    ds = PackedSequences(path, seq_len=16)
    batch = next(RankBatches(ds, 8, seed=0))
    assert batch.shape == (8, 17) and batch.dtype == torch.int64
    assert torch.equal(batch[:, 1:], batch[:, :-1] + 1)  # contiguous windows of the stream
    assert next(eval_batches(ds, 8)).shape == (8, 17)
