"""One intra-op thread for these tests: their tensors are tiny, so threads only add sync overhead (and spin
under a loaded machine); restored afterwards so other tests keep torch's default."""

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
