"""Image shards through the real img2dataset against a loopback server that serves JPEGs and failures."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from mllm_pipeline.download.images import ImageOptions, fetch_images
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.stages.media import iter_shard, read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import write_raw_shard

FAST = dict(processes=1, threads=8, timeout_s=2, retries=0, allow_loopback=True, image_size=64, resize_mode="keep_ratio_largest")


def _run(storage, raw, options, **kw):
    return materialize_shard(
        storage, dataset="cc3m", shard_key="shard-00000", shard_index=0, raw_uri=raw, raw_version=kw.pop("raw_version", "v1"),
        options=options.content_options(), fetch=lambda rows, log: fetch_images(rows, log, options), **kw)


def test_every_fault_is_a_counted_failure_with_its_reason(tmp_path, image_server):
    base = image_server.base_url
    cases = [
        (f"{base}/img/000.jpg", "success"),
        (f"{base}/img/001.jpg", "success"),
        (f"{base}/_fault/status/404/img/002.jpg", "http_404"),
        (f"{base}/_fault/status/500/img/003.jpg", "http_500"),
        (f"{base}/_fault/html", "not_media"),
        (f"{base}/_fault/truncated/img/004.jpg", "truncated"),
        (f"{base}/_fault/slow/4/img/005.jpg", "timeout"),
        (f"{base}/_fault/redirect?to=http://169.254.169.254/latest/meta-data/", "refused_url"),
        (f"{base}/_fault/redirect?to=http://10.0.0.1/x.jpg", "refused_url"),
        (f"{base}/_fault/redirect?to={base}/img/006.jpg", "success"),
        (f"{base}/_fault/429/1/img/007.jpg", "success"),
        ("file:///etc/passwd", "refused_url"),
        (f"{base}/img/does-not-exist.jpg", "http_404"),
    ]
    raw = write_raw_shard(tmp_path / "raw.parquet", [u for u, _ in cases])
    storage = Storage(str(tmp_path / "root"))
    out = _run(storage, raw, ImageOptions(**FAST, user_agent="mllm-pipeline-test/1.0"))
    status = read_status(storage, "cc3m", "shard-00000").sort_by("row")
    got = [("success" if s == "success" else r) for s, r in zip(status["status"].to_pylist(), status["reason"].to_pylist())]
    assert got == [want for _, want in cases], list(zip([u for u, _ in cases], got, status["detail"].to_pylist()))
    s = out.summary
    assert s["attempted"] == len(cases) == s["succeeded"] + sum(s["failed_by_reason"].values())
    stored = dict(iter_shard(storage, "cc3m", "shard-00000"))
    assert sorted(stored) == sorted(k for k in status["key"].to_pylist() if k)
    for files in stored.values():
        assert set(files) == {"jpg", "txt", "json"} and max(__import__("PIL.Image").Image.open(__import__("io").BytesIO(files["jpg"])).size) <= 64
    assert "mllm-pipeline-test/1.0" in image_server.user_agents


def test_skip_retry_failed_and_merge(tmp_path, image_server):
    base = image_server.base_url
    www = tmp_path / "www" / "img"
    urls = [f"{base}/img/{i:03d}.jpg" for i in range(10)] + [f"{base}/img/late-{i}.jpg" for i in range(3)]
    raw = write_raw_shard(tmp_path / "raw.parquet", urls)
    storage = Storage(str(tmp_path / "root"))
    options = ImageOptions(**FAST)
    first = _run(storage, raw, options)
    assert (first.summary["succeeded"], first.summary["failed_by_reason"]) == (10, {"http_404": 3})

    again = _run(storage, raw, options)
    assert again.skipped and again.fetched_rows == 0

    from mllm_pipeline_tests.download.conftest import make_jpeg
    for i in range(2):  # two of the three missing images appear on the server
        make_jpeg(www / f"late-{i}.jpg", 100, 80, 100 + i)
    before = {k: v["jpg"] for k, v in iter_shard(storage, "cc3m", "shard-00000")}
    retried = _run(storage, raw, options, retry_failed=True)
    assert retried.fetched_rows == 3 and retried.summary["succeeded"] == 12
    status = read_status(storage, "cc3m", "shard-00000")
    assert status.num_rows == 13 and len(set(status["sample_id"].to_pylist())) == 13
    assert pc.sum(status["attempts"]).as_py() == 10 * 1 + 3 * 2
    after = {k: v["jpg"] for k, v in iter_shard(storage, "cc3m", "shard-00000")}
    assert len(after) == 12 and all(after[k] == v for k, v in before.items())  # earlier successes kept as they were

    changed = _run(storage, raw, ImageOptions(**{**FAST, "image_size": 48}))  # new options: fetched again
    assert not changed.skipped and changed.fetched_rows == 13


def test_local_paths_are_decoded_and_missing_files_counted(tmp_path, image_server):
    www = tmp_path / "www" / "img"
    (www / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    paths = [str(www / "000.jpg"), str(www / "broken.jpg"), str(www / "nope.jpg")]
    raw = write_raw_shard(tmp_path / "raw.parquet", [None] * 3, paths, dataset="coco")
    storage = Storage(str(tmp_path / "root"))
    out = _run(storage, raw, ImageOptions(**FAST))
    assert out.summary["succeeded"] == 1
    assert out.summary["failed_by_reason"] == {"decode_error": 1, "missing_file": 1}


@pytest.mark.parametrize("mode", ["bogus"])
def test_bad_options_are_named(mode):
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        ImageOptions(resize_mode=mode)


def test_media_shard_on_s3(tmp_path, image_server, s3_env):
    """The same shard, written to a storage root on a real S3 endpoint (moto server on loopback)."""
    base = image_server.base_url
    raw = write_raw_shard(tmp_path / "raw.parquet", [f"{base}/img/{i:03d}.jpg" for i in range(5)] + [f"{base}/img/nope.jpg"])
    storage = Storage(f"s3://{s3_env}/pipeline")
    out = _run(storage, raw, ImageOptions(**FAST))
    assert (out.summary["succeeded"], out.summary["failed_by_reason"]) == (5, {"http_404": 1})
    assert out.location.startswith(f"s3://{s3_env}/pipeline/media/cc3m/shard-00000/v-")
    assert len(dict(iter_shard(storage, "cc3m", "shard-00000"))) == 5
    assert read_status(storage, "cc3m", "shard-00000").num_rows == 6
    assert _run(storage, raw, ImageOptions(**FAST)).skipped
