"""Shared fixtures: a fresh storage root per test, the real sample rows, and shard readers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto in server mode) on loopback."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MLLM_S3_ENDPOINT_URL", s3_endpoint)
    bucket = f"bucket-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    return bucket


@pytest.fixture(autouse=True)
def _no_stale_dagster_instance():
    """Leaving ``with DagsterInstance...:`` in Dagster 1.13 disposes the instance but leaves its definitions-state
    storage set as the process's current one; once a test instance's temporary folder is gone, every later
    ``Definitions`` load in the process fails with "unable to open database file". Clear it after each test."""
    yield
    if "dagster" in sys.modules:
        from dagster._core.storage.defs_state import base

        base._current_storage.set(None)


@pytest.fixture(scope="session")
def caption_tokenizer(tmp_path_factory) -> str:
    """A small BPE tokenizer trained on the spot (nothing downloaded), for assets whose ``tokenizer`` is required."""
    from mllm_pipeline.demo.tokenizer import train_tokenizer

    texts = ["a dog runs on the beach", "a man is cooking in a kitchen", "people walk in the city at night",
             "a red car parked near a tree", "a cat sleeps on a sofa"] * 40
    return str(train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=400))
