"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.procs import SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development corpus not found at {SHARED_DATA}")
    return SHARED_DATA
