"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hybrid_pretrain.tests.procs import SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development corpus not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, restored afterwards: for tests of tiny tensors, where a second thread spends far more
    time waiting at each op's barrier than it saves on a busy machine (35 ms vs 1.7 s a training step at load ~20)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
