"""Bad option values fail before any work, with the field, the value and the allowed range; failures that the
fetch options caused (not the URLs) are fetched again once those options change, and nothing else is."""

from __future__ import annotations

import dagster as dg
import pytest

from mllm_pipeline.defs.media.assets import images_cc3m, videos_webvid
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.download.images import ImageOptions
from mllm_pipeline.download.options import OptionError, refetch_reasons
from mllm_pipeline.download.videos import VideoOptions
from mllm_pipeline.sources.cc3m import ingest_cc3m
from mllm_pipeline.stages.media import read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import make_jpeg
from mllm_pipeline_tests.media_server import serve_directory

FAST = {"processes": 1, "threads": 8, "timeout_s": 20, "retries": 0, "image_size": 64}


def _failure(result: dg.ExecuteInProcessResult) -> str:
    """The step's failure message as Dagster shows it (the Failure's description)."""
    events = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert events, "the run did not fail"
    data = events[0].step_failure_data
    assert data.user_failure_data is not None, data.error.to_string()  # a dg.Failure, not an exception escaping
    return data.user_failure_data.description


@pytest.mark.parametrize("config, message", [
    ({"image_size": -100}, "image_size: -100 is out of range; allowed: 16 to 16383 (pixels)"),
    ({"timeout_s": 0}, "timeout_s: 0 is out of range; allowed: 1 to 3600 (seconds per request)"),
    ({"threads": 0}, "threads: 0 is out of range; allowed: 1 to 1024 (threads per process)"),
    ({"retries": -1}, "retries: -1 is out of range; allowed: 0 to 20 (retries per URL within one run)"),
    ({"processes": 0}, "processes: 0 is out of range; allowed: 1 to 1024"),
    ({"encode_quality": 101}, "encode_quality: 101 is out of range; allowed: 1 to 100 (the jpg quality)"),
    ({"encode_format": "png"}, "encode_quality: 95 is out of range; allowed: 0 to 9 (the PNG compression level"),
    ({"per_host_rate": 0}, "per_host_rate: 0.0 is out of range; allowed: more than 0"),
    ({"min_success_rate": 1.5}, "min_success_rate: 1.5 is out of range; allowed: 0 to 1"),
    ({"parallel_shards": 0}, "parallel_shards: 0 is out of range; allowed: 1 to 64"),
    ({"user_agent": "bot\r\nX-Injected: 1"}, "user_agent: 'bot\\r\\nX-Injected: 1' is not allowed"),
])
def test_an_out_of_range_image_option_fails_before_any_work(tmp_path, config, message):
    for i in range(3):
        make_jpeg(tmp_path / f"www/img/{i}.jpg", 64, 48, i)
    with serve_directory(tmp_path / "www") as server:
        tsv = tmp_path / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"a photo of thing number {i}\t{server.base_url}/img/{i}.jpg\n" for i in range(3)))
        storage = Storage(str(tmp_path / "root"))
        ingest_cc3m([str(tsv)], storage, rows_per_shard=10)
        with dg.DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions("cc3m_shards", ["shard-00000"])
            result = dg.materialize(
                [images_cc3m], instance=instance, partition_key="shard-00000", raise_on_error=False,
                resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()},
                run_config={"ops": {"images_cc3m": {"config": {**FAST, "allow_loopback": True, **config}}}})
        assert not result.success
        text = _failure(result)
        assert text.startswith(message) and text.endswith("Nothing was fetched or written."), text
        assert server.paths == []  # nothing fetched
        assert not storage.exists("media")  # nothing written


@pytest.mark.parametrize("config, message", [
    ({"download_size": 0}, "download_size: 0 is out of range; allowed: 1 to 4320"),
    ({"timeout_s": -5}, "timeout_s: -5 is out of range; allowed: 1 to 3600"),
    ({"max_clip_s": 0.0}, "max_clip_s: 0.0 is out of range; allowed: more than 0"),
    ({"retries": -1}, "retries: -1 is out of range; allowed: 0 to 20"),
])
def test_an_out_of_range_video_option_fails_before_any_work(tmp_path, config, message):
    storage = Storage(str(tmp_path / "root"))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("webvid_shards", ["shard-00000"])
        result = dg.materialize(
            [videos_webvid], instance=instance, partition_key="shard-00000", raise_on_error=False,
            resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()},
            run_config={"ops": {"videos_webvid": {"config": config}}})
    assert not result.success
    assert _failure(result).startswith(message)
    assert not storage.exists("media")


def test_the_option_classes_check_their_own_ranges():
    with pytest.raises(OptionError, match=r"image_size: 8 is out of range; allowed: 16 to 16383"):
        ImageOptions(image_size=8)
    with pytest.raises(OptionError, match=r"min_clip_s: -1.0 is out of range"):
        VideoOptions(min_clip_s=-1.0)
    with pytest.raises(OptionError, match=r"max_clip_s: 2.0 is out of range; allowed: more than 3"):
        VideoOptions(min_clip_s=3.0, max_clip_s=2.0)
    ImageOptions(encode_format="png", encode_quality=6)  # PNG's own scale
    assert ImageOptions(allow_loopback=True, timeout_s=5).fetch_options() == {
        "allow_loopback": True, "timeout_s": 5, "retries": 1, "user_agent": None, "per_host_rate": None,
        "deadline_s": 60.0, "max_body_mb": 32, "max_pixels": 25_000_000}
    assert "cookies" not in str(VideoOptions(yt_dlp_params={"cookiefile": "/secret/cookies.txt"}).fetch_options())


def test_refetch_reasons_follow_only_the_options_a_failure_depends_on():
    rec = {"allow_loopback": False, "timeout_s": 2, "retries": 0, "user_agent": None, "per_host_rate": None}
    failed = {"refused_url": 3, "timeout": 1, "http_404": 2}
    assert refetch_reasons(failed, rec, rec) == {}
    assert refetch_reasons(failed, rec, {**rec, "allow_loopback": True}) == {"refused_url": ["allow_loopback"]}
    assert refetch_reasons(failed, rec, {**rec, "timeout_s": 9, "retries": 2}) == {"timeout": ["timeout_s", "retries"]}
    assert refetch_reasons({"http_404": 2}, rec, {**rec, "allow_loopback": True, "timeout_s": 9}) == {}
    assert refetch_reasons(failed, None, rec) == {}  # committed before fetch options were recorded: not re-fetched


def test_failures_caused_by_the_fetch_options_are_fetched_again_when_they_change(tmp_path, monkeypatch):
    """Loopback refused, then allowed: the refused rows are fetched; a timeout, then a longer timeout: only the row
    that timed out is fetched; a 404 is never fetched again by an option change; an unchanged re-run fetches
    nothing."""
    monkeypatch.delenv("MLLM_ALLOW_LOOPBACK", raising=False)
    www = tmp_path / "www"
    for i in range(4):
        make_jpeg(www / f"img/{i}.jpg", 80, 60, i)
    with serve_directory(www) as server:
        paths = ["img/0.jpg", "img/1.jpg", "_fault/slow/4/img/2.jpg", "img/missing.jpg", "img/3.jpg"]
        tsv = tmp_path / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"a photo of thing number {i}\t{server.base_url}/{p}\n" for i, p in enumerate(paths)))
        storage = Storage(str(tmp_path / "root"))
        ingest_cc3m([str(tsv)], storage, rows_per_shard=10)

        def run(**config):
            seen = len(server.paths)
            with dg.DagsterInstance.ephemeral() as instance:
                instance.add_dynamic_partitions("cc3m_shards", ["shard-00000"])
                result = dg.materialize(
                    [images_cc3m], instance=instance, partition_key="shard-00000",
                    resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()},
                    run_config={"ops": {"images_cc3m": {"config": {**FAST, **config}}}})
                logs = [e.user_message for e in instance.all_logs(result.run_id)]
            status = read_status(storage, "cc3m", "shard-00000").sort_by("row")
            reasons = [r or "success" for r in status["reason"].to_pylist()]
            return sorted(p.rsplit("/", 1)[-1] for p in server.paths[seen:]), reasons, status, logs

        fetched, reasons, _, _ = run(allow_loopback=False)
        assert fetched == [] and reasons == ["refused_url"] * 5
        fetched, reasons, _, logs = run(allow_loopback=False)  # nothing changed: up to date
        assert fetched == [] and any("up to date" in m for m in logs)

        fetched, reasons, status, logs = run(allow_loopback=True, timeout_s=1)
        assert fetched == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "missing.jpg"]
        assert reasons == ["success", "success", "timeout", "http_404", "success"], status["detail"].to_pylist()
        assert any("refused_url: allow_loopback changed" in m for m in logs), logs
        before = {k: v for k, v in zip(status["row"].to_pylist(), status["bytes"].to_pylist())}

        fetched, _, _, logs = run(allow_loopback=True, timeout_s=1)  # unchanged again: nothing is fetched
        assert fetched == [] and any("up to date" in m for m in logs)
        fetched, _, _, _ = run(allow_loopback=True, timeout_s=1, user_agent="other/1.0")  # no failure depends on it
        assert fetched == []

        fetched, reasons, status, logs = run(allow_loopback=True, timeout_s=10)
        assert fetched == ["2.jpg"]  # only the row that timed out: no success, not the 404
        assert reasons == ["success", "success", "success", "http_404", "success"]
        assert any("timeout: timeout_s changed" in m for m in logs), logs
        after = dict(zip(status["row"].to_pylist(), status["bytes"].to_pylist()))
        assert all(after[r] == before[r] for r in (0, 1, 4))  # earlier successes kept as they were
        assert status["attempts"].to_pylist() == [2, 2, 3, 2, 2]
        manifest = storage.read_manifest("media/cc3m/shard-00000")
        assert manifest["fetch_options"]["timeout_s"] == 10 and manifest["summary"]["succeeded"] == 4
