"""The annotation-file sensor and the nightly retry schedules, evaluated against real files and real shards."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import pytest
import yaml
from PIL import Image

from mllm_pipeline.defs.schedules import contiguous_ranges
from mllm_pipeline.defs.sensors import raw_annotation_files_sensor
from mllm_pipeline.stages.watch import WATCH_CONFIG_ENV
from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.download.images import ImageOptions
from mllm_pipeline.download.fetched import Fetched
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.stages.media import read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.defs.automation_helpers import definitions_with_automation
from mllm_pipeline_tests.download.conftest import make_jpeg
from mllm_pipeline_tests.media_server import serve_directory

SENSOR = raw_annotation_files_sensor
RAW = {a.key.to_user_string(): a for a in RAW_ASSETS}


@pytest.fixture(scope="module")
def full_defs() -> dg.Definitions:
    return definitions_with_automation()


def test_automation_loads_with_the_code_location_and_is_off_by_default(full_defs):
    dg.Definitions.validate_loadable(full_defs)
    repo = full_defs.get_repository_def()
    assert repo.get_sensor_def("raw_annotation_files").default_status == dg.DefaultSensorStatus.STOPPED
    names = {s.name for s in repo.schedule_defs}
    for media in ("images_cc3m", "images_coco", "videos_webvid", "videos_msrvtt", "videos_internvid"):
        sched = repo.get_schedule_def(f"retry_failed_{media}")
        assert sched.default_status == dg.DefaultScheduleStatus.STOPPED and f"retry_failed_{media}" in names
        job = repo.get_job(f"download_{media}")
        assert int(job.tags["dagster/max_runtime"]) > 0


# -- the sensor -------------------------------------------------------------------------------------------------


def _tick(full_defs, instance, root: Path, cursor):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=full_defs,
                                  resources={"storage": StorageResource(root=str(root))})
    return SENSOR.evaluate_tick(ctx)


def _write_watch_config(path: Path, ops: dict) -> Path:
    path.write_text(yaml.safe_dump({"ops": {k: {"config": v} for k, v in ops.items()}}))
    return path


def test_sensor_requests_only_the_asset_whose_file_changed_and_never_twice(tmp_path, fixtures, monkeypatch, full_defs):
    data = tmp_path / "datasets"
    data.mkdir()
    tsv = data / "Train_GCC-training.tsv"
    tsv.write_text("a dog on a beach\thttp://example.org/1.jpg\na red car\thttp://example.org/2.jpg\n")
    csv = data / "results_2M_train.csv"
    shutil.copy(fixtures / "webvid_real_20.csv", csv)
    config = _write_watch_config(tmp_path / "watch.yaml", {
        "raw_cc3m": {"paths": [str(data / "*.tsv")]},
        "raw_webvid": {"paths": [str(csv)], "rows_per_shard": 8},
    })
    monkeypatch.setenv(WATCH_CONFIG_ENV, str(config))
    root = tmp_path / "root"

    with dg.instance_for_test() as instance:
        first = _tick(full_defs, instance, root, None)
        by_asset = {r.asset_selection[0].to_user_string(): r for r in first.run_requests}
        assert sorted(by_asset) == ["raw_cc3m", "raw_webvid"]  # first look: both are new
        assert by_asset["raw_webvid"].run_config == {"ops": {"raw_webvid": {"config": {"paths": [str(csv)], "rows_per_shard": 8}}}}

        unchanged = _tick(full_defs, instance, root, first.cursor)
        assert unchanged.run_requests == [] and "No new or changed" in unchanged.skip_message

        time.sleep(0.01)
        with tsv.open("a") as f:
            f.write("a cat asleep\thttp://example.org/3.jpg\n")
        changed = _tick(full_defs, instance, root, unchanged.cursor)
        assert [r.asset_selection[0].to_user_string() for r in changed.run_requests] == ["raw_cc3m"]
        assert changed.run_requests[0].run_key != by_asset["raw_cc3m"].run_key

        again = _tick(full_defs, instance, root, changed.cursor)
        assert again.run_requests == []

        # a new file that matches the glob is a change too
        (data / "Validation_GCC-1.1.0-Validation.tsv").write_text("a blue sky\thttp://example.org/4.jpg\n")
        added = _tick(full_defs, instance, root, again.cursor)
        assert [r.asset_selection[0].to_user_string() for r in added.run_requests] == ["raw_cc3m"]

        # the run key is a digest of the files' state: with the cursor lost, the unchanged asset gets the same
        # key as before (so the daemon does not launch it again)
        lost = _tick(full_defs, instance, root, None)
        keys = {r.asset_selection[0].to_user_string(): r.run_key for r in lost.run_requests}
        assert keys["raw_webvid"] == by_asset["raw_webvid"].run_key
        assert keys["raw_cc3m"] == added.run_requests[0].run_key

        # the requested run config is what the asset accepts: run it
        req = added.run_requests[0]
        result = dg.materialize([RAW["raw_cc3m"]], run_config=req.run_config, instance=instance,
                                resources={"storage": StorageResource(root=str(root))})
        md = result.asset_materializations_for_node("raw_cc3m")[0].metadata
        assert md["rows_in"].value == 4


def test_sensor_watches_s3_objects_by_etag(tmp_path, s3_env, monkeypatch, full_defs):
    import fsspec

    from mllm_pipeline.storage import s3_storage_options

    bucket = s3_env
    fs = fsspec.filesystem("s3", **s3_storage_options())
    fs.pipe(f"{bucket}/cc3m/Train_GCC-training.tsv", b"a dog\thttp://example.org/1.jpg\n")
    fs.pipe(f"{bucket}/internvid/InternVid-10M-flt.jsonl", b"{}\n")
    config = _write_watch_config(tmp_path / "watch.yaml", {
        "raw_cc3m": {"paths": [f"s3://{bucket}/cc3m/*.tsv"]},
        "raw_internvid": {"paths": [f"s3://{bucket}/internvid/InternVid-10M-flt.jsonl"]},
    })
    monkeypatch.setenv(WATCH_CONFIG_ENV, str(config))
    with dg.instance_for_test() as instance:
        first = _tick(full_defs, instance, tmp_path / "root", None)
        assert len(first.run_requests) == 2
        assert first.run_requests[0].run_config["ops"]["raw_cc3m"]["config"]["paths"] == [f"s3://{bucket}/cc3m/*.tsv"]
        assert _tick(full_defs, instance, tmp_path / "root", first.cursor).run_requests == []
        fs.pipe(f"{bucket}/cc3m/Train_GCC-training.tsv", b"a cat\thttp://example.org/2.jpg\n")  # same size, new ETag
        fs.invalidate_cache()
        changed = _tick(full_defs, instance, tmp_path / "root", first.cursor)
        assert [r.asset_selection[0].to_user_string() for r in changed.run_requests] == ["raw_cc3m"]


def test_sensor_watches_nothing_without_a_watch_config_and_explains_a_bad_one(tmp_path, monkeypatch, full_defs):
    from mllm_pipeline.demo.paths import ensure_demo_corpus

    monkeypatch.delenv(WATCH_CONFIG_ENV, raising=False)
    monkeypatch.delenv("MLLM_DEMO_DIR", raising=False)
    root = tmp_path / "root"
    with dg.instance_for_test() as instance:
        ensure_demo_corpus(Storage(str(root)))  # a demo corpus on the root is not watched unless named
        nothing = _tick(full_defs, instance, root, None)
        assert nothing.run_requests == [] and WATCH_CONFIG_ENV in nothing.skip_message

        bad = tmp_path / "bad.yaml"
        bad.write_text("raw_cc3m:\n  paths: [/x.tsv]\n")  # not in run-config shape
        monkeypatch.setenv(WATCH_CONFIG_ENV, str(bad))
        skipped = _tick(full_defs, instance, root, None)
        assert skipped.run_requests == [] and str(bad) in skipped.skip_message and "'ops'" in skipped.skip_message


# -- the retry schedules ----------------------------------------------------------------------------------------


def test_contiguous_ranges():
    assert contiguous_ranges(["shard-00005", "shard-00001", "shard-00002", "shard-00000"]) == [
        ("shard-00000", "shard-00002"), ("shard-00005", "shard-00005")]
    assert contiguous_ranges([]) == []


def _local_fetcher(www: Path):
    """Reads the URL's file from the served folder (what the loopback server would answer), without HTTP."""

    def fetch(rows, log):
        for r in rows:
            parts = urlsplit(r["url"])
            if parts.hostname != "127.0.0.1":
                yield Fetched(r["row"], False, "refused_url", "not a loopback address")
                continue
            f = www / parts.path.lstrip("/")
            if not f.exists():
                yield Fetched(r["row"], False, "http_404", "404 Not Found")
                continue
            with Image.open(f) as im:
                size = im.size
            yield Fetched(r["row"], True, media=("jpg", f.read_bytes()), width=size[0], height=size[1])

    return fetch


def test_retry_schedule_requests_only_shards_with_failures_and_the_run_retries_them(tmp_path, full_defs):
    www = tmp_path / "www"
    root = tmp_path / "root"
    storage = Storage(str(root))
    missing = {3, 4, 13}  # rows 3, 4 (shards 1, 2) and 13 (shard 6) answer 404
    for i in range(14):
        if i not in missing:
            make_jpeg(www / f"img/{i:03d}.jpg", 80 + i, 60 + i, i)
    repo = full_defs.get_repository_def()
    schedule = repo.get_schedule_def("retry_failed_images_cc3m")
    storage_config = {"storage": {"config": {"root": str(root)}}}

    with serve_directory(www) as server, dg.instance_for_test() as instance:
        urls = [f"{server.base_url}/img/{i:03d}.jpg" for i in range(14)]
        urls[9] = "http://10.0.0.1/img/009.jpg"  # shard 4: refused by the URL policy, which a retry cannot change
        tsv = tmp_path / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"caption {i}\t{u}\n" for i, u in enumerate(urls)))
        dg.materialize([RAW["raw_cc3m"]], instance=instance, resources={"storage": StorageResource(root=str(root))},
                       run_config={"ops": {"raw_cc3m": {"config": {"paths": [str(tsv)], "rows_per_shard": 2}}}})
        assert instance.get_dynamic_partitions("cc3m_shards") == [f"shard-{i:05d}" for i in range(7)]

        def evaluate():
            ctx = dg.build_schedule_context(instance=instance, repository_def=repo,
                                            resources={"storage": StorageResource(root=str(root))})
            return schedule.evaluate_tick(ctx)

        assert evaluate().skip_message  # nothing committed yet: nothing to retry

        raw = storage.read_manifest("raw/cc3m")
        options = ImageOptions().content_options()  # what a download run with default config stores
        for i in (0, 1, 2, 3, 4, 6):  # shard 5 is never downloaded
            materialize_shard(storage, dataset="cc3m", shard_key=f"shard-{i:05d}", shard_index=i,
                              raw_uri=storage.uri(f"raw/cc3m/{raw['version']}/{raw['shards'][i]['file']}"),
                              raw_version=raw["version"], options=options, fetch=_local_fetcher(www))
        failed = {i: storage.read_manifest(f"media/cc3m/shard-{i:05d}")["summary"]["failed_by_reason"] for i in range(7) if i != 5}
        assert failed == {0: {}, 1: {"http_404": 1}, 2: {"http_404": 1}, 3: {}, 4: {"refused_url": 1}, 6: {"http_404": 1}}

        tick = evaluate()
        reqs = tick.run_requests
        assert len(reqs) == 2, reqs
        assert all(r.job_name == "download_images_cc3m" for r in reqs)
        assert all(r.run_config == {"ops": {"images_cc3m": {"config": {"retry_failed": True}}}} for r in reqs)
        ranged, single = sorted(reqs, key=lambda r: r.run_key)
        assert ranged.partition_key is None
        assert (ranged.tags["dagster/asset_partition_range_start"], ranged.tags["dagster/asset_partition_range_end"]) == (
            "shard-00001", "shard-00002")
        assert single.partition_key == "shard-00006"

        # the images appear; the requested runs (as the daemon would launch them) fetch only the failed rows
        for i in missing:
            make_jpeg(www / f"img/{i:03d}.jpg", 70, 50, 100 + i)
        before = {i: storage.read_manifest(f"media/cc3m/shard-{i:05d}")["version"] for i in (0, 3, 4)}
        job = full_defs.resolve_job_def("download_images_cc3m")
        served = len(server.paths)
        for req in reqs:
            run_config = {
                "ops": {"images_cc3m": {"config": {**req.run_config["ops"]["images_cc3m"]["config"], "allow_loopback": True,
                                                    "processes": 1, "threads": 4, "timeout_s": 5}}},
                "resources": storage_config,
            }
            result = job.execute_in_process(run_config=run_config, instance=instance, partition_key=req.partition_key,
                                            tags=req.tags)
            assert result.success
        for i in (1, 2, 6):
            m = storage.read_manifest(f"media/cc3m/shard-{i:05d}")
            assert m["summary"]["failed_by_reason"] == {} and m["summary"]["succeeded"] == 2
            status = read_status(storage, "cc3m", f"shard-{i:05d}").sort_by("row")
            assert status["attempts"].to_pylist() == [1 + (i * 2 + r in missing) for r in range(2)]
        assert {i: storage.read_manifest(f"media/cc3m/shard-{i:05d}")["version"] for i in (0, 3, 4)} == before
        assert not storage.exists("media/cc3m/shard-00005/_manifest.json")  # never fetched by a retry
        assert sorted(server.paths[served:]) == [f"/img/{i:03d}.jpg" for i in sorted(missing)]

        assert evaluate().skip_message  # what is left (a refused URL) is not retried
