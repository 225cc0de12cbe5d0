"""Tiny tensors throughout these tests: run them on one intra-op thread (see tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    pass
