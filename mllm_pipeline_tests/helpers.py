"""Helpers shared by the tests."""

from __future__ import annotations

import os

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from mllm_pipeline.sources.common import read_quarantine, read_raw_shards
from mllm_pipeline.storage import Storage


def read_raw(storage: Storage, dataset: str, prefix: str | None = None) -> pa.Table:
    """All committed raw shards of ``dataset`` as one table."""
    return pa.concat_tables([pq.read_table(u) for u in read_raw_shards(storage, dataset, prefix)])


def quarantine_rows(storage: Storage, dataset: str, prefix: str | None = None) -> list[dict]:
    return read_quarantine(storage, dataset, prefix).to_pylist()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(message: str) -> None:
    """Skip on a developer machine that lacks a server or package; fail loudly in CI, where the test must run."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: this test must run; scripts/setup.sh and scripts/test.sh install it)", pytrace=False)
    pytest.skip(message)
