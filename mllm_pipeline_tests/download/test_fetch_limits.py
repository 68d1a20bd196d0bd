"""Limits on every fetch: a body over ``max_body_mb`` (announced, chunked or open-ended), a response not complete by
``deadline_s`` (a drip of bytes, of the body or of the head), an image over ``max_pixels`` (a small PNG of 30000 x
30000 pixels) each end as that row's failure reason, through the real img2dataset behind either guard, and through
the guard proxy that video2dataset / yt-dlp use; and a shard with such URLs among good ones stays within a memory
bound."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import requests

from mllm_pipeline.download.accounting import REASONS, reason_detail
from mllm_pipeline.download.guard.proxy import GuardProxy
from mllm_pipeline.download.guard.url_policy import UrlPolicy
from mllm_pipeline.download.images import ImageOptions, fetch_images
from mllm_pipeline.stages.media import NOT_RETRIED, materialize_shard, read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import make_jpeg, write_raw_shard
from mllm_pipeline_tests.media_server import serve_directory

REPO = Path(__file__).resolve().parents[2]
FAST = dict(processes=1, threads=8, timeout_s=3, retries=0, allow_loopback=True, image_size=64, max_body_mb=1,
            deadline_s=2.0)


def bomb_png(w: int, h: int, rows: int = 500) -> bytes:
    """A valid grayscale PNG of w x h black pixels, under 1 MB for 30000 x 30000. The rows are deflated ``rows`` at a
    time after a full flush (so every block compresses to the same bytes, repeated) to make it in a second."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    assert h % rows == 0
    block = bytes(w + 1) * rows  # filter byte 0 + w zero pixels, per row
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(h // rows):
        adler = zlib.adler32(block, adler)
    idat = b"\x78\xda" + body * (h // rows) + c.flush() + struct.pack(">I", adler)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = bomb_png(30000, 30000)
    assert len(data) < 1_000_000  # 900 megapixels in under a megabyte
    return data


@pytest.fixture
def hostile_server(tmp_path, bomb):
    root = tmp_path / "www"
    for i in range(40):
        make_jpeg(root / f"img/{i:03d}.jpg", 120 + 7 * i, 90 + 5 * i, i)
    (root / "bomb.png").write_bytes(bomb)
    with serve_directory(root) as server:
        yield server


def hostile_cases(base: str) -> list[tuple[str, str]]:
    return [
        (f"{base}/img/000.jpg", "success"),
        (f"{base}/_fault/huge/2048", "body_too_large"),  # Content-Length: 2 GiB
        (f"{base}/_fault/huge/2048?length=0", "body_too_large"),  # no length: the body ends with the connection
        (f"{base}/_fault/endless", "body_too_large"),  # chunked, never ends
        (f"{base}/_fault/drip/0.5/img/001.jpg", "deadline_exceeded"),  # a byte every 0.5 s: no read ever times out
        (f"{base}/_fault/driphead/0.5", "deadline_exceeded"),  # the same, of the status line and headers
        (f"{base}/bomb.png", "too_many_pixels"),
        (f"{base}/img/002.jpg", "success"),
    ]


def _shard(tmp_path, urls, options):
    storage = Storage(str(tmp_path / "root"))
    out = materialize_shard(storage, dataset="cc3m", shard_key="shard-00000", shard_index=0,
                            raw_uri=write_raw_shard(tmp_path / "raw.parquet", urls), raw_version="v1",
                            options=options.content_options(), fetch=lambda rows, log: fetch_images(rows, log, options))
    status = read_status(storage, "cc3m", "shard-00000").sort_by("row")
    got = [("success" if s == "success" else r) for s, r in zip(status["status"].to_pylist(), status["reason"].to_pylist())]
    return out, got, status["detail"].to_pylist()


@pytest.mark.parametrize("guard", ["inline", "proxy"])
def test_each_limit_is_a_reason_not_a_crash(tmp_path, hostile_server, guard):
    cases = hostile_cases(hostile_server.base_url)
    t0 = time.monotonic()
    out, got, details = _shard(tmp_path, [u for u, _ in cases], ImageOptions(**FAST, guard=guard))
    seconds = time.monotonic() - t0
    assert got == [want for _, want in cases], list(zip([u for u, _ in cases], got, details))
    assert out.summary["failed_by_reason"] == {"body_too_large": 3, "deadline_exceeded": 2, "too_many_pixels": 1}
    by_url = dict(zip([u for u, _ in cases], details))
    assert "Content-Length 2147483648 bytes" in by_url[cases[1][0]]
    assert "over the limit of 1048576 bytes" in by_url[cases[3][0]]
    assert "deadline of 2s" in by_url[cases[4][0]]
    assert "max_pixels" in by_url[cases[6][0]]
    # two drips of up to 60 s each, cut at 2 s; the rest is img2dataset's start
    assert seconds < 30, seconds


def test_pillow_checks_pixels_before_decoding(tmp_path, hostile_server, bomb):
    """resize_mode: no (img2dataset stores the bytes; this process decodes them) and files on disk."""
    from mllm_pipeline.download.images import TooManyPixels, _decode

    with pytest.raises(TooManyPixels, match="3000x3000 = 9000000 pixels"):
        _decode(bomb_png(3000, 3000), max_pixels=4_000_000)
    assert _decode(bomb_png(3000, 3000), max_pixels=9_000_000) == (3000, 3000)
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "bomb.png").write_bytes(bomb)
    base = hostile_server.base_url
    storage = Storage(str(tmp_path / "root"))
    options = ImageOptions(**{**FAST, "resize_mode": "no"})
    out = materialize_shard(storage, dataset="cc3m", shard_key="shard-00000", shard_index=0,
                            raw_uri=write_raw_shard(tmp_path / "raw.parquet", [f"{base}/bomb.png", f"{base}/img/003.jpg", None],
                                                    paths=[None, None, str(tmp_path / "disk" / "bomb.png")]),
                            raw_version="v1", options=options.content_options(),
                            fetch=lambda rows, log: fetch_images(rows, log, options))
    status = read_status(storage, "cc3m", "shard-00000").sort_by("row")
    assert status["reason"].to_pylist() == ["too_many_pixels", None, "too_many_pixels"]
    assert "900000000 pixels" in status["detail"][0].as_py()  # Pillow's own limit (179 MP) refuses it first
    assert out.summary["succeeded"] == 1


def test_the_guard_proxy_bounds_what_video_downloaders_get(tmp_path, hostile_server):
    """video2dataset reads a direct download with requests (``resp.content``); every such request goes through the
    guard proxy, whose record names the limit even where the client only sees a cut-off body."""
    base = hostile_server.base_url
    cases = [(u, want) for u, want in hostile_cases(base) if want != "too_many_pixels"]
    with GuardProxy(UrlPolicy(allow_loopback=True), max_body_bytes=1 << 20, deadline_s=2.0) as proxy:
        got = []
        for url, _ in cases:
            try:
                r = requests.get(url, stream=True, timeout=3, proxies={"http": proxy.url, "https": proxy.url})
                body, message = r.content, (None if r.ok else f"{r.status_code} {r.reason}")
            except requests.RequestException as e:
                body, message = None, str(e)
            _, verdict = proxy.verdict(url)
            if message is None and verdict is None:
                got.append("success")
            else:
                got.append(reason_detail(message, verdict)[0])
            assert body is None or len(body) <= 1 << 20
    assert got == [want for _, want in cases], list(zip([u for u, _ in cases], got))


def test_video2dataset_gets_the_same_reasons(tmp_path):
    """The real video2dataset (its own environment; direct MP4 URLs, read with requests) behind the guard proxy."""
    import random

    from mllm_pipeline.demo.generate import write_mp4
    from mllm_pipeline.download.videos import VideoOptions, fetch_videos, subprocess_launcher, video2dataset_python
    from mllm_pipeline_tests.helpers import unavailable

    try:
        video2dataset_python()
    except FileNotFoundError:
        unavailable("the video2dataset environment is not set up (scripts/setup.sh, or set MLLM_VIDEO2DATASET_PYTHON)")
    root = tmp_path / "www"
    write_mp4(root / "v/0.mp4", 4, random.Random(1))
    with serve_directory(root) as server:
        b = server.base_url
        cases = [(f"{b}/v/0.mp4", "success"), (f"{b}/_fault/huge/2048/big.mp4", "body_too_large"),
                 (f"{b}/_fault/endless/never.mp4", "body_too_large"), (f"{b}/_fault/drip/0.5/v/0.mp4", "deadline_exceeded")]
        storage = Storage(str(tmp_path / "root"))
        options = VideoOptions(processes=1, threads=4, timeout_s=3, allow_loopback=True, max_body_mb=1, deadline_s=2.0)
        t0 = time.monotonic()
        materialize_shard(storage, dataset="webvid", shard_key="shard-00000", shard_index=0,
                          raw_uri=write_raw_shard(tmp_path / "raw.parquet", [u for u, _ in cases], dataset="webvid"),
                          raw_version="v1", options=options.content_options(),
                          fetch=lambda rows, log: fetch_videos(rows, log, options, subprocess_launcher))
        seconds = time.monotonic() - t0
    status = read_status(storage, "webvid", "shard-00000").sort_by("row")
    got = [("success" if s == "success" else r) for s, r in zip(status["status"].to_pylist(), status["reason"].to_pylist())]
    assert got == [want for _, want in cases], list(zip(got, status["detail"].to_pylist()))
    assert seconds < 60, seconds


def test_reasons_and_retry_rules():
    for reason in ("body_too_large", "deadline_exceeded", "too_many_pixels"):
        assert reason in REASONS
    assert {"body_too_large", "too_many_pixels"} <= NOT_RETRIED  # the same bytes come back: permanent
    assert "deadline_exceeded" not in NOT_RETRIED  # a slow server or network: worth another try


def test_limits_are_options_with_ranges_recorded_as_fetch_options():
    from mllm_pipeline.defs.media.assets import ImageShardConfig, VideoShardConfig
    from mllm_pipeline.download.videos import VideoOptions

    # checked where every other numeric option is (the asset turns the error into a Failure before any work)
    for bad, message in ((dict(max_body_mb=0), "max_body_mb: 0 is out of range; allowed: 1 to 1024"),
                         (dict(max_pixels=10), "max_pixels: 10 is out of range; allowed: 1e+06 to 1e+09"),
                         (dict(deadline_s=0.1), "deadline_s: 0.1 is out of range; allowed: 1 to 3600")):
        with pytest.raises(ValueError, match=re.escape(message)):
            ImageOptions(**bad)
    with pytest.raises(ValueError, match="max_body_mb: 100000 is out of range; allowed: 1 to 16384"):
        VideoOptions(max_body_mb=100_000)
    for config, options in ((ImageShardConfig(), ImageOptions()), (VideoShardConfig(), VideoOptions())):
        for name in ("max_body_mb", "deadline_s", *(("max_pixels",) if isinstance(options, ImageOptions) else ())):
            assert getattr(config, name) == getattr(options, name)
            assert type(config).model_fields[name].description
    assert (ImageOptions().max_body_mb, ImageOptions().max_pixels, VideoOptions().max_body_mb) == (32, 25_000_000, 256)
    # the limits decide what may be fetched, not how it is stored: not part of a shard's identity (a new limit never
    # re-fetches a stored shard), but recorded with it, so raising one fetches again only the rows it refused
    from mllm_pipeline.download.options import refetch_reasons

    for options, changed in ((ImageOptions(max_pixels=50_000_000), "max_pixels"), (ImageOptions(max_body_mb=64), "max_body_mb"),
                             (ImageOptions(deadline_s=10), "deadline_s"), (VideoOptions(max_body_mb=64), "max_body_mb")):
        base = type(options)()
        assert base.content_options() == options.content_options()
        failed = {"body_too_large": 3, "too_many_pixels": 2, "deadline_exceeded": 1, "http_404": 5}
        got = refetch_reasons(failed, base.fetch_options(), options.fetch_options())
        assert got and all(changed in opts for opts in got.values()) and "http_404" not in got


# -- memory -----------------------------------------------------------------------------------------------------
_MEASURE = r"""
import json, sys, threading, time, resource
import psutil
from mllm_pipeline.download.images import ImageOptions, fetch_images

urls = json.loads(sys.argv[1])
rows = [{"row": i, "sample_id": f"s{i}", "url": u} for i, u in enumerate(urls)]
me, peak, stop = psutil.Process(), [0], threading.Event()

def sample():  # the RSS of this process and every process below it (img2dataset's workers), summed
    while not stop.wait(0.02):
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)

t = threading.Thread(target=sample, daemon=True); t.start()
options = ImageOptions(processes=1, threads=16, timeout_s=5, retries=0, allow_loopback=True, deadline_s=3.0)
log = type("L", (), {"info": staticmethod(lambda *a: None), "warning": staticmethod(lambda *a: None)})()
results = {f.row: f.reason or "success" for f in fetch_images(rows, log, options)}
stop.set(); t.join()
print(json.dumps({"peak_tree_rss": peak[0], "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "reasons": [results[i] for i in range(len(urls))]}))
"""


def _measure(*url_lists: list[str]) -> list[dict]:
    """Each URL list fetched as one shard in a fresh process (its own peak, nothing of earlier tests), all at once."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", _MEASURE, json.dumps(urls)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for urls in url_lists]
    found = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err[-3000:]
        found.append(json.loads(out.strip().splitlines()[-1]))
    return found


def test_peak_memory_of_a_shard_with_hostile_urls_stays_bounded(hostile_server):
    """The default limits (32 MiB bodies, 25 MP images), an img2dataset worker of 16 threads, 40 good JPEGs with and without
    9 hostile URLs among them: 2 GiB bodies announced, unannounced and chunked, pixel bombs, a drip.

    The bound: whatever the clean run took, plus two copies (the chunks read, then joined) of the largest body allowed
    for each hostile body URL (32 MiB x 2 x 6), plus 128 MiB for allocator slack. Without the limits the same URLs
    grew the run past 3 GB (issue 26), and each bomb decode alone costs ~1 GB."""
    base = hostile_server.base_url
    good = [f"{base}/img/{i:03d}.jpg" for i in range(40)]
    hostile = [f"{base}/_fault/huge/2048", f"{base}/_fault/huge/2048?length=0", f"{base}/_fault/endless",
               f"{base}/_fault/huge/2048?length=0&n=2", f"{base}/_fault/endless?n=2", f"{base}/_fault/huge/2048?n=2",
               f"{base}/bomb.png", f"{base}/bomb.png?n=2", f"{base}/_fault/drip/0.5/img/000.jpg"]
    mixed = good[:10] + hostile[:3] + good[10:20] + hostile[3:6] + good[20:30] + hostile[6:] + good[30:]
    clean, dirty = _measure(good, mixed)
    assert clean["reasons"] == ["success"] * 40
    want = {u: "success" for u in good} | {u: "body_too_large" for u in hostile[:6]} | \
        {hostile[6]: "too_many_pixels", hostile[7]: "too_many_pixels", hostile[8]: "deadline_exceeded"}
    assert dirty["reasons"] == [want[u] for u in mixed]
    mib = 1 << 20
    print(f"\npeak RSS of the run (this process + img2dataset's workers, summed): clean {clean['peak_tree_rss'] / mib:.0f} "
          f"MiB, with hostile URLs {dirty['peak_tree_rss'] / mib:.0f} MiB; largest single process: clean "
          f"{max(clean['maxrss_self'], clean['maxrss_children']) / mib:.0f} MiB, hostile "
          f"{max(dirty['maxrss_self'], dirty['maxrss_children']) / mib:.0f} MiB")
    bound = clean["peak_tree_rss"] + 6 * 2 * 32 * mib + 128 * mib
    assert dirty["peak_tree_rss"] < bound, (dirty["peak_tree_rss"] / mib, bound / mib)
    assert max(dirty["maxrss_self"], dirty["maxrss_children"]) < \
        max(clean["maxrss_self"], clean["maxrss_children"]) + 6 * 2 * 32 * mib + 128 * mib
