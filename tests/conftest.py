"""Fixtures shared by the test modules (see tests/README in the Development section of README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data: small real microscopy sets; tests that need it skip when it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    return DATA
