"""Fixed-length training sequences cut from one flat token stream on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hybrid_pretrain.data_pipeline.errors import DataError


class PackedSequences(Dataset):
    """Sample `i` is `tokens[i*L : i*L + L + 1]` of a memory-mapped token stream (L = `seq_len`).

    Documents are packed back to back with EOS between them, so no position is padding. Consecutive
    samples share one boundary token, so every token is a label exactly once: inputs are `[:-1]`,
    labels `[1:]`. The memmap opens lazily, so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, bin_path: str | Path, seq_len: int, dtype: np.dtype | str = np.uint16) -> None:
        self.path = Path(bin_path)
        self.seq_len = int(seq_len)
        self.dtype = np.dtype(dtype)
        if self.seq_len <= 0:
            raise DataError(f"data.seq_len must be a positive integer, got {seq_len}")
        if not self.path.is_file():
            raise DataError(f"token file '{self.path}' does not exist; run prepare_data first")
        self.num_tokens = self.path.stat().st_size // self.dtype.itemsize
        if self.num_tokens < self.seq_len + 1:
            raise DataError(
                f"corpus too small for data.seq_len={self.seq_len}: '{self.path}' holds {self.num_tokens} tokens, "
                f"expected at least seq_len + 1 = {self.seq_len + 1}"
            )
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        """(seq_len + 1,) int64 tokens of sample `i`."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} sequences")
        start = (i % len(self)) * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}  # a memmap does not pickle; reopen in the worker

    def __repr__(self) -> str:
        return f"PackedSequences('{self.path}', seq_len={self.seq_len}, sequences={len(self)})"
