"""HTTPS is first class: the real img2dataset and video2dataset against loopback HTTPS servers with their own CA
(trusted through SSL_CERT_FILE / REQUESTS_CA_BUNDLE), through the guard proxy, which sees inside TLS."""

from __future__ import annotations

import contextlib
import ssl
import time
import urllib.error
import urllib.request

import pytest

from mllm_pipeline.download.guard.proxy import GuardProxy
from mllm_pipeline.download.images import ImageOptions, fetch_images, shared_guard
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.stages.media import iter_shard, read_status
from mllm_pipeline.download.guard.url_policy import UrlPolicy
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import refused_port, write_raw_shard

FAST = dict(processes=1, threads=8, timeout_s=3, retries=0, allow_loopback=True, image_size=64)


def _reasons(storage, dataset="cc3m"):
    status = read_status(storage, dataset, "shard-00000").sort_by("row")
    return [("success" if s == "success" else r) for s, r in zip(status["status"].to_pylist(), status["reason"].to_pylist())], \
        status["detail"].to_pylist()


# inline: the guard inside img2dataset's workers; proxy with 2: relay processes, records sent back to this process
@pytest.mark.parametrize("guard,guard_processes", [("inline", 1), ("proxy", 1), ("proxy", 2)])
def test_images_over_https(tmp_path, https_image_server, untrusted_https_server, guard, guard_processes):
    b = https_image_server.base_url
    cases = [
        (f"{b}/img/000.jpg", "success"),
        (f"{b}/_fault/status/404/img/001.jpg", "http_404"),
        (f"{b}/img/nope.jpg", "http_404"),
        (f"{b}/_fault/429/1/img/002.jpg?after=1", "success"),  # retried after the server's Retry-After
        (f"{b}/_fault/redirect?to=http://169.254.169.254/latest/meta-data/", "refused_url"),
        (f"{b}/_fault/redirect?to=https://10.0.0.1/x.jpg", "refused_url"),
        (f"{b}/_fault/redirect?to={b}/img/003.jpg", "success"),
        (f"{b}/_fault/html", "not_media"),
        (f"{b}/_fault/robots/noai/img/004.jpg", "opted_out"),
        (f"{b}/_fault/robots/otherbot:%20noimageai/img/005.jpg", "success"),  # a directive for another user agent
        (f"https://127.0.0.1:{refused_port()}/x.jpg", "connection_error"),
        (f"{untrusted_https_server.base_url}/img/000.jpg", "tls_error"),
        ("https://no-such-host.invalid/x.jpg", "dns_error"),
    ]
    raw = write_raw_shard(tmp_path / "raw.parquet", [u for u, _ in cases])
    storage = Storage(str(tmp_path / "root"))
    options = ImageOptions(**FAST, user_agent="mllm-pipeline-test/2.0", guard=guard, guard_processes=guard_processes)
    out = materialize_shard(storage, dataset="cc3m", shard_key="shard-00000", shard_index=0, raw_uri=raw, raw_version="v1",
                            options=options.content_options(), fetch=lambda rows, log: fetch_images(rows, log, options))
    got, details = _reasons(storage)
    assert got == [w for _, w in cases], list(zip([u for u, _ in cases], got, details))
    by_reason = dict(zip(got, details))
    assert by_reason["opted_out"] == "X-Robots-Tag: noai"
    assert "link-local" in details[4] and "private" in details[5]
    assert "certificate" in by_reason["tls_error"] and "no-such-host.invalid" in by_reason["dns_error"]
    assert "refused" in by_reason["connection_error"].lower()
    assert out.summary["succeeded"] == 4 and len(dict(iter_shard(storage, "cc3m", "shard-00000"))) == 4
    # the guard saw inside TLS: every request the server got carried the configured user agent
    assert https_image_server.user_agents and set(https_image_server.user_agents) == {"mllm-pipeline-test/2.0"}
    assert https_image_server.paths.count("/_fault/429/1/img/002.jpg?after=1") == 2


def _https_get(proxy: GuardProxy, url: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=proxy.env()["SSL_CERT_FILE"])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": proxy.url}),
                                         urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_retry_after_and_rate_limit_hold_inside_tls(https_image_server):
    b = https_image_server.base_url
    with GuardProxy(UrlPolicy(allow_loopback=True)) as proxy:
        t0 = time.monotonic()
        status, body = _https_get(proxy, f"{b}/_fault/429/1/img/006.jpg?after=1")
        assert status == 200 and body[:2] == b"\xff\xd8" and proxy.stats.retried_429 == 1
        assert time.monotonic() - t0 >= 0.95  # waited for Retry-After: 1
    with GuardProxy(UrlPolicy(allow_loopback=True), per_host_rate=10) as proxy:
        t0 = time.monotonic()
        for _ in range(4):
            assert _https_get(proxy, f"{b}/img/007.jpg")[0] == 200
        assert time.monotonic() - t0 >= 3 / 10 * 0.9


@pytest.mark.parametrize("directives,want", [(("noai", "noimageai"), 403), ((), 200)])
def test_opt_out_directives_are_configurable(https_image_server, directives, want):
    with GuardProxy(UrlPolicy(allow_loopback=True), disallowed_directives=directives) as proxy:
        status, body = _https_get(proxy, f"{https_image_server.base_url}/_fault/robots/noimageai/img/008.jpg")
        assert status == want
        if want == 403:
            assert proxy.verdict(f"{https_image_server.base_url}/_fault/robots/noimageai/img/008.jpg")[1] == \
                ("opted_out", "X-Robots-Tag: noimageai")


def test_videos_over_https(tmp_path, trusted_ca):
    """video2dataset (requests) over HTTPS: a stored 404 body, an opt-out, a refused port and a DNS failure, each
    with its own reason (the proxy saw the statuses inside TLS)."""
    import random

    from mllm_pipeline.demo.generate import write_mp4
    from mllm_pipeline.download.videos import VideoOptions, fetch_videos, subprocess_launcher, video2dataset_python
    from mllm_pipeline_tests.download.test_videos import _raw
    from mllm_pipeline_tests.helpers import unavailable
    from mllm_pipeline_tests.media_server import serve_directory

    try:
        video2dataset_python()
    except FileNotFoundError as e:
        unavailable(str(e))
    rng = random.Random(3)
    root = tmp_path / "vwww"
    for i in range(2):
        write_mp4(root / f"v/{i}.mp4", 3, rng)
    with serve_directory(root, ssl_context=trusted_ca.server_context("127.0.0.1")) as server:
        b = server.base_url
        cases = [
            (f"{b}/v/0.mp4", "success"),
            (f"{b}/_fault/status/404/v/1.mp4", "http_404"),
            (f"{b}/_fault/robots/noai/v/1.mp4", "opted_out"),
            (f"https://127.0.0.1:{refused_port()}/v.mp4", "connection_error"),
            ("https://no-such-host.invalid/v.mp4", "dns_error"),
        ]
        storage = Storage(str(tmp_path / "root"))
        options = VideoOptions(processes=1, threads=4, timeout_s=5, allow_loopback=True, user_agent="mllm-video-test/1")
        materialize_shard(storage, dataset="webvid", shard_key="shard-00000", shard_index=0,
                          raw_uri=_raw(tmp_path / "raw.parquet", [(u, None, None) for u, _ in cases]), raw_version="v1",
                          options=options.content_options(),
                          fetch=lambda rs, log: fetch_videos(rs, log, options, subprocess_launcher))
        got, details = _reasons(storage, "webvid")
        assert got == [w for _, w in cases], list(zip(got, details))
        assert details[2] == "X-Robots-Tag: noai" and "/tmp" not in " ".join(d for d in details if d)
        assert set(server.user_agents) == {"mllm-video-test/1"}


def test_inline_guard_rate_limit_holds_across_worker_processes(tmp_path, https_image_server):
    """Two img2dataset worker processes, one per-host rate limit: the table of slots is shared between them."""
    b = https_image_server.base_url
    raw = write_raw_shard(tmp_path / "raw.parquet", [f"{b}/img/{i:03d}.jpg" for i in range(6)])
    storage = Storage(str(tmp_path / "root"))
    options = ImageOptions(**{**FAST, "processes": 2}, per_host_rate=10)
    with shared_guard(options) as guard:
        out = materialize_shard(storage, dataset="cc3m", shard_key="shard-00000", shard_index=0, raw_uri=raw,
                                raw_version="v1", options=options.content_options(),
                                fetch=lambda rows, log: fetch_images(rows, log, options, guard))
        guard.sync()
        assert guard.stats.requests == 6 and guard.cpu_seconds < 1.0
    assert out.summary["succeeded"] == 6
    times = sorted(https_image_server.times)
    assert len(times) == 6
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.1 * 0.8, times


@contextlib.contextmanager
def _inline_opener(settings):
    """The inline guard's opener installed in this process for the block, then the previous one put back."""
    from mllm_pipeline.download.guard.inline import install

    old = urllib.request._opener  # noqa: SLF001
    install(settings)
    try:
        yield
    finally:
        urllib.request.install_opener(old)


def test_inline_guard_in_this_process(image_server):
    """The inline guard's opener on its own: a loopback host is refused unless allowed, a redirect to another scheme
    is refused, the user agent is set, and each refusal is counted."""
    from mllm_pipeline.download.guard.inline import InlineGuard, write_stats

    url = f"{image_server.base_url}/img/000.jpg"
    with InlineGuard(UrlPolicy()) as guard, _inline_opener(guard.settings):
        with pytest.raises(urllib.error.URLError, match=r"Refused By URL Policy: refused_address: 127\.0\.0\.1 .*loopback"):
            urllib.request.urlopen(url, timeout=5)
        write_stats()
        guard.sync()
        assert dict(guard.stats.refused) == {"refused_address": 1} and guard.stats.requests == 0
    with InlineGuard(UrlPolicy(allow_loopback=True), user_agent="inline-test/1.0") as guard, _inline_opener(guard.settings):
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200 and r.read(2) == b"\xff\xd8"
        with pytest.raises(urllib.error.URLError, match="refused_scheme: file"):
            urllib.request.urlopen(f"{image_server.base_url}/_fault/redirect?to=file:///etc/passwd", timeout=5)
    assert image_server.user_agents[-2:] == ["inline-test/1.0"] * 2
    assert urllib.request._opener is None or not any(  # noqa: SLF001 -- the block put the old opener back
        type(h).__module__.endswith("guard.inline") for h in urllib.request._opener.handlers)  # noqa: SLF001
