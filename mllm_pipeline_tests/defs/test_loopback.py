"""Loopback is allowed only by the explicit flag: annotation files on S3 (as the demo's once were recognised by
their place) never make the media stage fetch from 127.0.0.1."""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.defs.ingest.assets import raw_cc3m
from mllm_pipeline.defs.media.assets import images_cc3m
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.stages.media import read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import make_jpeg
from mllm_pipeline_tests.media_server import serve_directory


def test_raw_files_on_s3_never_enable_loopback(tmp_path, s3_env, monkeypatch):
    monkeypatch.delenv("MLLM_ALLOW_LOOPBACK", raising=False)
    for i in range(4):
        make_jpeg(tmp_path / f"www/img/{i}.jpg", 64, 48, i)
    with serve_directory(tmp_path / "www") as server:
        tsv = "".join(f"a photo of a thing number {i}\t{server.base_url}/img/{i}.jpg\n" for i in range(4))
        Storage(f"s3://{s3_env}/annotations").write_bytes("Train_GCC-training.tsv", tsv.encode())
        root = f"s3://{s3_env}/pipeline"
        resources = {"storage": StorageResource(root=root), "tracking": TrackingResource()}
        with dg.instance_for_test() as instance:
            raw = dg.materialize([raw_cc3m], instance=instance, resources=resources, run_config={"ops": {"raw_cc3m": {
                "config": {"paths": [f"s3://{s3_env}/annotations/Train_GCC-training.tsv"]}}}})
            assert raw.success
            media = dg.materialize([images_cc3m], instance=instance, resources=resources, partition_key="shard-00000",
                                   run_config={"ops": {"images_cc3m": {"config": {"processes": 1, "threads": 4,
                                                                                  "retries": 0}}}})
            assert media.success
        status = read_status(Storage(root), "cc3m", "shard-00000")
        assert status["reason"].to_pylist() == ["refused_url"] * 4
        assert server.paths == []  # not one request reached the loopback server
