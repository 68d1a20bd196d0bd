"""img2dataset's and video2dataset's own pyspark distributors in Spark local mode (``local[2]``), behind the guard
proxy, with the same per-row accounting as the multiprocessing path.

Spark needs Java and pyspark; without them these tests skip, except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from mllm_pipeline.download.images import ImageOptions, fetch_images
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.stages.media import iter_shard, read_status
from mllm_pipeline.download.spark import check_spark_options, spark_session
from mllm_pipeline.download.videos import VideoOptions, fetch_videos, subprocess_launcher, video2dataset_python
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import write_raw_shard
from mllm_pipeline_tests.helpers import unavailable
from mllm_pipeline_tests.download.test_videos import _raw, video_server  # noqa: F401 -- the fixture



def _missing() -> str | None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no Java (Spark needs a JRE, 17 or newer)"
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed (pip install -e '.[dev]')"
    return None


def _v2d_missing() -> str | None:
    try:
        python = video2dataset_python()
    except FileNotFoundError as e:
        return str(e)
    if subprocess.run([python, "-c", "import pyspark"], capture_output=True).returncode != 0:
        return "pyspark is not installed in the video2dataset environment (scripts/setup.sh)"
    return None


def _require(why: str | None) -> None:
    if why is not None:
        unavailable(why)


@pytest.fixture(scope="module")
def spark():
    """One local[2] session for the module; the image path finds it active and uses it (and leaves it running)."""
    _require(_missing())
    with spark_session("local[2]", app_name="mllm-pipeline-tests", conf={"spark.ui.enabled": "false"}) as s:
        yield s


def test_cluster_master_needs_a_reachable_proxy_and_a_shared_work_dir():
    check_spark_options("pyspark", "local[2]", "127.0.0.1", None)
    with pytest.raises(ValueError, match="proxy_host"):
        ImageOptions(distributor="pyspark", spark_master="spark://head:7077")
    with pytest.raises(ValueError, match="work_dir"):
        VideoOptions(distributor="pyspark", spark_master="k8s://https://api:6443", proxy_host="10.1.2.3")
    with pytest.raises(ValueError, match="distributor"):
        ImageOptions(distributor="ray")


def test_image_shard_through_spark(tmp_path, image_server, spark):
    base = image_server.base_url
    cases = [
        (f"{base}/img/000.jpg", "success"),
        (f"{base}/img/001.jpg", "success"),
        (f"{base}/_fault/status/404/img/002.jpg", "http_404"),
        (f"{base}/_fault/redirect?to=http://169.254.169.254/latest/meta-data/", "refused_url"),
        (f"{base}/_fault/redirect?to={base}/img/006.jpg", "success"),
        ("file:///etc/passwd", "refused_url"),
        (f"{base}/img/does-not-exist.jpg", "http_404"),
    ] + [(f"{base}/img/{i:03d}.jpg", "success") for i in range(10, 20)]
    raw = write_raw_shard(tmp_path / "raw.parquet", [u for u, _ in cases])
    storage = Storage(str(tmp_path / "root"))
    options = ImageOptions(processes=2, threads=4, timeout_s=3, retries=0, allow_loopback=True, image_size=64,
                           user_agent="mllm-spark-test/1.0", distributor="pyspark", spark_master="local[2]")
    out = materialize_shard(storage, dataset="cc3m", shard_key="shard-00000", shard_index=0, raw_uri=raw,
                            raw_version="v1", options=options.content_options(),
                            fetch=lambda rows, log: fetch_images(rows, log, options))
    status = read_status(storage, "cc3m", "shard-00000").sort_by("row")
    got = [("success" if s == "success" else r) for s, r in zip(status["status"].to_pylist(), status["reason"].to_pylist())]
    assert got == [w for _, w in cases], list(zip([u for u, _ in cases], got, status["detail"].to_pylist()))
    s = out.summary
    assert (s["attempted"], s["succeeded"], s["failed_by_reason"]) == (17, 13, {"http_404": 2, "refused_url": 2})
    assert len(dict(iter_shard(storage, "cc3m", "shard-00000"))) == 13
    # the requests came through the guard proxy (it sets the User-Agent), from Spark's Python workers
    assert "mllm-spark-test/1.0" in image_server.user_agents
    # img2dataset used the module's session (it ran its jobs there and left it running)
    assert spark.sparkContext.statusTracker().getJobIdsForGroup(None)
    assert not spark.sparkContext._jsc.sc().isStopped()


def test_video_shard_through_spark(tmp_path, video_server, capfd):  # noqa: F811
    _require(_missing() or _v2d_missing())
    b = video_server.base_url
    cases = [
        (f"{b}/v/0.mp4", "success"),
        (f"{b}/v/1.mp4", "success"),
        (f"{b}/_fault/status/404/v/2.mp4", "http_404"),
        (f"{b}/_fault/redirect?to=http://169.254.169.254/latest/x.mp4", "refused_url"),
        ("file:///etc/passwd.mp4", "refused_url"),
    ]
    storage = Storage(str(tmp_path / "root"))
    options = VideoOptions(processes=2, threads=2, timeout_s=5, allow_loopback=True, user_agent="mllm-spark-test/1.0",
                           distributor="pyspark", spark_master="local[2]")
    out = materialize_shard(storage, dataset="webvid", shard_key="shard-00000", shard_index=0,
                            raw_uri=_raw(tmp_path / "raw.parquet", [(u, None, None) for u, _ in cases]), raw_version="v1",
                            options=options.content_options(),
                            fetch=lambda rs, log: fetch_videos(rs, log, options, subprocess_launcher))
    status = read_status(storage, "webvid", "shard-00000").sort_by("row")
    got = [("success" if s == "success" else r) for s, r in zip(status["status"].to_pylist(), status["reason"].to_pylist())]
    assert got == [w for _, w in cases], list(zip(got, status["detail"].to_pylist()))
    s = out.summary
    assert s["attempted"] == len(cases) == s["succeeded"] + sum(s["failed_by_reason"].values())
    assert len(dict(iter_shard(storage, "webvid", "shard-00000"))) == 2
    assert "/v/0.mp4" in video_server.paths and "/v/1.mp4" in video_server.paths
    assert re.search(r"video2dataset ran [1-9]\d* Spark job\(s\) on local\[2\]", capfd.readouterr().out)
