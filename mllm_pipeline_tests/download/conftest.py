"""Shared fixtures: a loopback media server with generated JPEGs, and raw shards that point at it."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mllm_pipeline_tests.media_server import serve_directory


def make_jpeg(path: Path, w: int, h: int, seed: int) -> None:
    rng = random.Random(seed)
    im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(20):  # some structure, so the JPEG is not trivially small
        x, y = rng.randrange(w), rng.randrange(h)
        im.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(w, x + 30), min(h, y + 30)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


@pytest.fixture
def image_server(tmp_path):
    root = tmp_path / "www"
    for i in range(30):
        make_jpeg(root / f"img/{i:03d}.jpg", 120 + 7 * i, 90 + 5 * i, i)
    with serve_directory(root) as server:
        yield server


def write_raw_shard(path: Path, urls: list[str | None], paths: list[str | None] | None = None, dataset: str = "cc3m") -> str:
    n = len(urls)
    table = pa.table({
        "sample_id": [f"{dataset}-{i}" for i in range(n)],
        "dataset": [dataset] * n,
        "split": ["train"] * n,
        "media_kind": ["image"] * n,
        "url": urls,
        "path": paths or [None] * n,
        "group_id": pa.nulls(n, pa.string()),
        "captions": [[f"caption number {i}"] for i in range(n)],
        "clip_start_s": pa.nulls(n, pa.float64()),
        "clip_end_s": pa.nulls(n, pa.float64()),
        "duration_s": pa.nulls(n, pa.float64()),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def trusted_ca(tmp_path, monkeypatch):
    """A test CA that this process and its children trust through the usual CA-bundle variables."""
    from mllm_pipeline_tests.download.tls import TestCA

    ca = TestCA(tmp_path / "ca")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.setenv(var, ca.ca_file)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    return ca


@pytest.fixture
def https_image_server(tmp_path, trusted_ca):
    """The image server of ``image_server`` over HTTPS, its certificate signed by ``trusted_ca``."""
    root = tmp_path / "www"
    for i in range(12):
        make_jpeg(root / f"img/{i:03d}.jpg", 120 + 7 * i, 90 + 5 * i, i)
    with serve_directory(root, ssl_context=trusted_ca.server_context("127.0.0.1")) as server:
        yield server


@pytest.fixture
def untrusted_https_server(tmp_path):
    """An HTTPS server whose certificate comes from a CA nobody trusts."""
    from mllm_pipeline_tests.download.tls import TestCA

    root = tmp_path / "www-untrusted"
    make_jpeg(root / "img/000.jpg", 100, 80, 1)
    with serve_directory(root, ssl_context=TestCA(tmp_path / "rogue-ca", "rogue CA").server_context("127.0.0.1")) as server:
        yield server


def refused_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
