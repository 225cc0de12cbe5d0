"""One intra-op thread for these tests: their tensors are tiny, and on a busy machine a second thread spends far
more time waiting at each op's barrier than it saves (measured 35 ms vs 1.7 s per training step at load ~20)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
