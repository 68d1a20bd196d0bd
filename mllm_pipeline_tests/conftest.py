"""Shared fixtures: a fresh storage root per test, the real sample rows, and shard readers."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_pipeline.storage import Storage

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "root"))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
