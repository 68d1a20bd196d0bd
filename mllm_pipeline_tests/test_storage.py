"""The storage root: atomic files, committed versions, and the same behaviour on a real S3 endpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from mllm_pipeline.storage import Storage


def test_atomic_write_publishes_only_on_success(storage):
    with storage.atomic_write("a/b.txt") as f:
        f.write(b"one")
    with pytest.raises(RuntimeError):
        with storage.atomic_write("a/b.txt") as f:
            f.write(b"half-written")
            raise RuntimeError("killed mid-write")
    assert storage.read_bytes("a/b.txt") == b"one"
    assert storage.listdir("a") == ["b.txt"]  # no temporary file left behind


def test_uncommitted_version_is_never_read_and_is_cleaned_up(storage):
    with storage.new_version("raw/x") as v1:
        storage.write_bytes(v1.rel("shard-00000.parquet"), b"v1")
        v1.commit({"shards": [{"file": "shard-00000.parquet", "rows": 1}]})
    # a run that dies after writing a shard but before committing
    v2 = storage.new_version("raw/x")
    storage.write_bytes(v2.rel("shard-00000.parquet"), b"half")
    assert storage.read_manifest("raw/x")["version"] == v1.id  # readers still see v1
    with pytest.raises(ValueError):
        with storage.new_version("raw/x") as v3:
            storage.write_bytes(v3.rel("shard-00000.parquet"), b"v3")
            raise ValueError("failed before commit")
    assert v3.id not in storage.listdir("raw/x")  # a failing run removes its own files
    with storage.new_version("raw/x") as v4:
        storage.write_bytes(v4.rel("shard-00000.parquet"), b"v4")
        v4.commit({"shards": [{"file": "shard-00000.parquet", "rows": 1}]})
    assert storage.listdir("raw/x") == sorted(["_manifest.json", v4.id])  # the dead run's leftovers are gone


def test_missing_manifest_message(storage):
    with pytest.raises(FileNotFoundError, match="materialize the asset"):
        storage.read_manifest("raw/nothing")


def test_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLLM_STORAGE_ROOT", str(tmp_path / "elsewhere"))
    assert Storage().root == str(tmp_path / "elsewhere")




def test_s3_root_atomic_writes_and_versions(s3_env):
    storage = Storage(f"s3://{s3_env}/pipeline")
    assert not storage.local
    with pytest.raises(RuntimeError):
        with storage.atomic_write("a/b.bin") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("killed")
    assert storage.listdir("a") == []
    with storage.new_version("raw/x") as v:
        storage.write_bytes(v.rel("shard-00000.parquet"), b"data")
        v.commit({"shards": [{"file": "shard-00000.parquet", "rows": 1}]})
    m = storage.read_manifest("raw/x")
    assert m["location"] == f"s3://{s3_env}/pipeline/raw/x/{v.id}"
    assert storage.read_bytes(f"raw/x/{v.id}/shard-00000.parquet") == b"data"


def test_s3_source_to_s3_root(s3_env, fixtures):
    """A WebVid CSV read from s3:// into shards written to s3://, through the same parser."""
    import fsspec

    from mllm_pipeline.sources.webvid import ingest_webvid
    from mllm_pipeline.storage import storage_options_for
    from mllm_pipeline_tests.helpers import read_raw

    src = f"s3://{s3_env}/annotations/results_2M_val.csv"
    with fsspec.open(src, "wb", **storage_options_for(src)) as f:
        f.write((fixtures / "webvid_real_20.csv").read_bytes())
    storage = Storage(f"s3://{s3_env}/root")
    report = ingest_webvid([src], storage)
    assert report.rows_kept == 20 and report.location.startswith(f"s3://{s3_env}/root/raw/webvid/")
    import pyarrow.parquet as pq

    from mllm_pipeline.sources.common import read_raw_shards

    uris = read_raw_shards(storage, "webvid")
    with fsspec.open(uris[0], "rb", **storage_options_for(uris[0])) as f:
        assert pq.read_table(f).num_rows == 20
