"""Per-rank batch streams: shuffled and resumable for training, fixed for evaluation.

The order is a pure function of (seed, epoch, step), so a resumed run consumes exactly the batches an
uninterrupted one would have, on any number of restarts, without saving any index arrays.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from hybrid_pretrain.data_pipeline.errors import DataError


def _check_ranks(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size <= 0:
        raise DataError(f"train.micro_batch_size must be a positive integer, got {micro_batch_size}")
    if dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise DataError(f"data-parallel rank {dp_rank} is outside a group of size {dp_size}")


def _stack(dataset: Dataset, indices: np.ndarray) -> torch.Tensor:
    return torch.stack([dataset[int(i)] for i in indices])


class RankBatches:
    """Infinite iterator of (B, seq_len + 1) int64 batches for one data-parallel rank.

    Each epoch visits the samples in a permutation drawn from (seed, epoch). Global batch `b` is the
    next `dp_size * B` samples of that permutation and rank `r` takes the `r`-th micro-batch of it, so
    ranks never share a sample within an epoch. The ragged tail of an epoch (fewer than `dp_size * B`
    samples) is dropped so every rank takes the same number of steps.
    """

    def __init__(
        self, dataset: Dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
        repeat: int = 0,
    ) -> None:
        """``repeat`` > 0: only the first ``repeat`` batches of epoch 0, over and over (train.overfit_batches)."""
        _check_ranks(micro_batch_size, dp_rank, dp_size)
        if seed < 0:
            raise DataError(f"train.seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.num_samples = len(dataset)
        self.steps_per_epoch = self.num_samples // (micro_batch_size * dp_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"training set has {self.num_samples} sequences, fewer than one global batch of "
                f"micro_batch_size * dp_size = {micro_batch_size} * {dp_size}; use more data or smaller batches"
            )
        if not 0 <= repeat <= self.steps_per_epoch:
            raise DataError(f"train.overfit_batches must be in [0, {self.steps_per_epoch}] (0: off; at most the "
                            f"{self.steps_per_epoch} batches of one epoch on this rank), got {repeat}")
        self.repeat = repeat
        self.epoch = 0
        self.step = 0  # next batch within the epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample order of `epoch`; the same on every rank and every run with this seed."""
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> RankBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.repeat and self.step >= self.repeat:
            self.step = 0  # the same batches again: the epoch never advances
        elif self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        start = (self.step * self.dp_size + self.dp_rank) * self.micro_batch_size
        indices = self.permutation(self.epoch)[start : start + self.micro_batch_size]
        self.step += 1
        return _stack(self.dataset, indices)

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch; with the same dataset, batch size and seed it fully determines the rest."""
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "step"} - set(state)
        if missing:
            raise DataError(f"data sampler state is missing {sorted(missing)}; expected keys 'epoch' and 'step'")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise DataError(
                f"data sampler state epoch={epoch}, step={step} does not fit this dataset "
                f"({self.steps_per_epoch} steps per epoch); was the corpus or batch size changed?"
            )
        self.epoch, self.step = epoch, step


def eval_batches(
    dataset: Dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, num_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Fixed, unshuffled (B, seq_len + 1) batches for validation: the same every call.

    Global batch `j` holds samples `j*dp_size*B ...` in order and rank `r` takes micro-batch `r`. Every
    rank yields the same number of batches (so all-reduced losses never wait on a rank that ran out),
    at most `num_batches` (None: one pass). A validation set smaller than one global batch wraps around.
    """
    _check_ranks(micro_batch_size, dp_rank, dp_size)
    n = len(dataset)
    if n == 0:
        raise DataError("validation set holds no sequences")
    full = max(1, n // (micro_batch_size * dp_size))
    count = full if num_batches is None else min(num_batches, full)
    for j in range(count):
        start = (j * dp_size + dp_rank) * micro_batch_size
        yield _stack(dataset, np.arange(start, start + micro_batch_size) % n)
