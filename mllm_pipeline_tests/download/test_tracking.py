"""An image shard fetched with tracking on: the asset's per-shard statistics reach W&B (offline) and TensorBoard and
match the shard's status table; img2dataset's own W&B reporting runs in the asset run's group with the same counts;
no URL secret reaches either. Real img2dataset downloads from a loopback server; nothing leaves the machine."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from mllm_pipeline.defs.media.assets import images_cc3m
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.sources.cc3m import ingest_cc3m
from mllm_pipeline.stages.media import read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.defs.test_media_assets import FAST, _corpus, _tsv
from mllm_pipeline_tests.media_server import serve_directory
from mllm_pipeline_tests.tracking_readers import offline_runs, read_offline_run, tensorboard_scalars

SECRET = "hunter2-do-not-log"


def test_image_shard_statistics_reach_wandb_and_tensorboard(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    www = _corpus(tmp_path, 10, missing=frozenset({1, 5, 7}))
    with serve_directory(www) as server:
        tsv = _tsv(tmp_path, server.base_url, 10)
        lines = tsv.read_text().splitlines()  # two rows whose URLs carry credentials: one found, one missing
        lines[3] = lines[3].replace("http://", f"http://user:{SECRET}@") + f"?token={SECRET}"
        lines[5] = lines[5] + f"?X-Amz-Signature={SECRET}"
        tsv.write_text("\n".join(lines) + "\n")
        storage = Storage(str(tmp_path / "root"))
        ingest_cc3m([str(tsv)], storage, rows_per_shard=10)
        tracking = TrackingResource(wandb=True, mode="offline", project="mllm-test", wandb_dir=str(wandb_dir),
                                    tensorboard=True, tensorboard_dir=str(tmp_path / "tb"))
        with dg.DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions("cc3m_shards", ["shard-00000"])
            result = dg.materialize(
                [images_cc3m], instance=instance, partition_key="shard-00000",
                resources={"storage": StorageResource(root=storage.root), "tracking": tracking},
                run_config={"ops": {"images_cc3m": {"config": FAST}}},
            )
    assert result.success
    md = result.asset_materializations_for_node("images_cc3m")[0].metadata
    status = read_status(storage, "cc3m", "shard-00000").to_pylist()
    succeeded = sum(r["status"] == "success" for r in status)
    reasons = Counter(r["reason"] for r in status if r["status"] != "success")
    assert len(status) == 10 and 0 < succeeded < 10

    run = read_offline_run(md["wandb_run"].value)  # the asset's own run, linked from the metadata
    assert (run.name, run.job_type, run.project) == ("images_cc3m/shard-00000", "download", "mllm-test")
    expected = {"shard/attempted": 10, "shard/succeeded": succeeded, "shard/failed": 10 - succeeded,
                "shard/success_rate": succeeded / 10, **{f"shard/failed/{k}": v for k, v in reasons.items()}}
    for name, value in expected.items():
        assert run.series(name) == {1: pytest.approx(value)}, name
    assert run.summary["succeeded"] == succeeded and run.summary["attempted"] == 10
    assert run.config["dataset"] == "cc3m" and run.config["shards"] == ["shard-00000"]

    scalars = tensorboard_scalars(md["tensorboard_log_dir"].value)
    for name, value in expected.items():
        assert scalars[name] == {1: pytest.approx(value)}, name

    # img2dataset's own reporting: a run of its own in the asset run's group, with the same counts
    (i2d,) = [r for r in offline_runs(wandb_dir) if r.job_type == "img2dataset"]
    assert i2d.name == "images_cc3m/shard-00000/img2dataset" and i2d.group == run.group == run.name
    assert i2d.summary["total/count"] == 10
    assert i2d.summary["total/success"] == pytest.approx(succeeded / 10)

    for path in [*wandb_dir.rglob("*"), *(tmp_path / "tb").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert Path(md["tensorboard_log_dir"].value).is_relative_to(tmp_path / "tb")
