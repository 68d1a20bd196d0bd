"""The URL policy and the guard proxy, with urllib (what img2dataset uses) against a real loopback server."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from mllm_pipeline.download.guard.proxy import REFUSED_MARKER, GuardProxy
from mllm_pipeline.download.guard.url_policy import UrlPolicy
from mllm_pipeline_tests.media_server import serve_directory


@pytest.mark.parametrize(
    "url,allowed",
    [
        ("http://127.0.0.1:8000/a.jpg", False),
        ("http://localhost/a.jpg", False),
        ("http://169.254.169.254/latest/meta-data/", False),
        ("http://[fe80::1]/x", False),
        ("http://10.0.0.5/x.jpg", False),
        ("http://192.168.1.10/x.jpg", False),
        ("http://224.0.0.1/x", False),
        ("http://0.0.0.0/x", False),
        ("http://[::ffff:169.254.169.254]/x", False),
        ("ftp://93.184.216.34/x.jpg", False),
        ("file:///etc/passwd", False),
        ("http://93.184.216.34/x.jpg", True),
        ("https://93.184.216.34:8443/x.jpg", True),
    ],
)
def test_default_policy(url, allowed):
    assert (UrlPolicy().refusal(url) is None) == allowed


def test_loopback_setting_never_admits_link_local():
    policy = UrlPolicy(allow_loopback=True)
    assert policy.refusal("http://127.0.0.1:8000/a.jpg") is None
    assert "link-local" in policy.refusal("http://169.254.169.254/")
    assert "private" in policy.refusal("http://10.1.2.3/")


@pytest.fixture
def media(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8" + b"x" * 5000)
    with serve_directory(tmp_path) as server:
        yield server


def _get(proxy: GuardProxy, url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url}))
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, str(e).encode()


def test_proxy_fetches_allowed_and_refuses_the_rest(media):
    with GuardProxy(UrlPolicy(allow_loopback=True), user_agent="mllm-test/1") as proxy:
        status, body = _get(proxy, f"{media.base_url}/a.jpg")
        assert status == 200 and len(body) == 5002
        assert media.user_agents[-1] == "mllm-test/1"
        # a redirect from an allowed host to the cloud metadata address is refused at the redirect
        status, body = _get(proxy, f"{media.base_url}/_fault/redirect?to=http://169.254.169.254/latest/meta-data/")
        assert status == 403 and REFUSED_MARKER.encode() in body
        assert proxy.stats.refused["refused_address"] == 1
        assert "link-local" in proxy.stats.refused_urls[-1][1]
    with GuardProxy(UrlPolicy()) as strict:
        status, _ = _get(strict, f"{media.base_url}/a.jpg")
        assert status == 403 and "loopback" in strict.stats.refused_urls[-1][1]


def test_proxy_retries_429_and_rate_limits(media):
    with GuardProxy(UrlPolicy(allow_loopback=True), backoff_s=0.01) as proxy:
        status, body = _get(proxy, f"{media.base_url}/_fault/429/2/a.jpg")
        assert status == 200 and len(body) == 5002 and proxy.stats.retried_429 == 2
    with GuardProxy(UrlPolicy(allow_loopback=True), per_host_rate=20) as proxy:
        t0 = time.monotonic()
        for _ in range(6):
            assert _get(proxy, f"{media.base_url}/a.jpg")[0] == 200
        assert time.monotonic() - t0 >= 5 / 20 * 0.9


def test_server_faults(media):
    with GuardProxy(UrlPolicy(allow_loopback=True)) as proxy:
        assert _get(proxy, f"{media.base_url}/_fault/status/500")[0] == 500
        assert _get(proxy, f"{media.base_url}/../../etc/passwd")[0] == 404
        status, body = _get(proxy, f"{media.base_url}/_fault/html/a.jpg")
        assert status == 200 and body.startswith(b"<html>")


def test_guard_with_several_processes_keeps_one_rate_limit_and_returns_every_record(image_server):
    """Two relay processes on one socket: the per-host rate limit is global (timestamps at the server), and the
    statuses and refusals they record reach this process (verdict after sync)."""
    import threading
    import urllib.error
    import urllib.request

    from mllm_pipeline.download.guard.proxy import GuardProxy
    from mllm_pipeline.download.guard.url_policy import UrlPolicy

    b = image_server.base_url
    rate = 10.0
    urls = [f"{b}/img/{i:03d}.jpg" for i in range(20)]
    with GuardProxy(UrlPolicy(allow_loopback=True), per_host_rate=rate, processes=2) as proxy:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
        codes: dict[str, int] = {}

        def get(u: str) -> None:
            try:
                with opener.open(u, timeout=20) as r:
                    codes[u] = r.status
            except urllib.error.HTTPError as e:
                codes[u] = e.code

        extra = [f"{b}/img/nope.jpg", f"{b}/_fault/redirect?to=http://169.254.169.254/latest/meta-data/"]
        threads = [threading.Thread(target=get, args=(u,)) for u in urls + extra]
        [t.start() for t in threads]
        [t.join() for t in threads]
        proxy.sync()
        assert proxy.verdict(extra[0])[0] == 404
        _, verdict = proxy.verdict(extra[1])
        assert verdict is not None and verdict[0] == "refused_url" and "link-local" in verdict[1]
        assert all(proxy.verdict(u)[0] == 200 for u in urls)
    assert proxy.stats.requests == len(urls) + len(extra) + 1 and proxy.cpu_seconds > 0  # +1: the redirect followed
    assert all(codes[u] == 200 for u in urls)
    times = sorted(image_server.times)
    assert len(times) >= len(urls) + 1
    # 21+ requests to one host at 10/s span at least ~2 s; two relay processes with their own limits would halve it
    assert times[-1] - times[0] >= (len(times) - 1) / rate * 0.9
    busiest = max(sum(1 for u in times[i:] if u - t < 1.0) for i, t in enumerate(times))
    assert busiest <= rate + 2
