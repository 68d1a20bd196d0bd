"""Failure reasons from the messages downloaders really print (urllib/img2dataset, requests/video2dataset, yt-dlp,
the guard proxy's answers)."""

from __future__ import annotations

import pytest

from mllm_pipeline.download.accounting import classify_error, reason_detail
from mllm_pipeline.download.guard.proxy import robots_opt_out
from mllm_pipeline.download.videos import readable_detail

MESSAGES = [
    # urllib (img2dataset) direct and through the guard proxy
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("<urlopen error [Errno -3] Temporary failure in name resolution>", "dns_error"),
    ("<urlopen error Tunnel connection failed: 502 Guard DNS Failure>", "dns_error"),
    ("HTTP Error 502: Guard DNS Failure", "dns_error"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("<urlopen error Tunnel connection failed: 502 Guard Connection Failed>", "connection_error"),
    ("[Errno 104] Connection reset by peer", "connection_error"),
    ("<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate (_ssl.c:1006)>", "tls_error"),
    ("<urlopen error Tunnel connection failed: 502 Guard TLS Failure>", "tls_error"),
    ("<urlopen error Tunnel connection failed: 504 Guard Upstream Timeout>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("HTTP Error 403: Opted Out By X-Robots-Tag", "opted_out"),
    ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
    ("HTTP Error 403: Refused By URL Policy", "refused_url"),
    ("HTTP Error 404: Not Found", "http_404"),
    ("HTTP Error 429: Too Many Requests", "http_429"),
    # requests (video2dataset's direct downloads)
    ("HTTPSConnectionPool(host='videos.example.com', port=443): Max retries exceeded with url: /a.mp4 (Caused by "
     "NameResolutionError(\"<urllib3.connection.HTTPSConnection object at 0x7f>: Failed to resolve 'videos.example.com' "
     "([Errno -2] Name or service not known)\"))", "dns_error"),
    ("HTTPSConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /a.mp4 (Caused by ProxyError('Unable "
     "to connect to proxy', OSError('Tunnel connection failed: 502 Guard Connection Failed')))", "connection_error"),
    ("HTTPSConnectionPool(host='x', port=443): Max retries exceeded with url: /a.mp4 (Caused by SSLError(SSLCertVerificationError"
     "(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)')))", "tls_error"),
    ("HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: /a.mp4 (Caused by NewConnectionError("
     "'<urllib3.connection.HTTPConnection object at 0x7f>: Failed to establish a new connection: [Errno 111] Connection refused'))",
     "connection_error"),
    # yt-dlp
    ("ERROR: [youtube] dQw4w9WgXcQ: Sign in to confirm you\u2019re not a bot. Use --cookies-from-browser or --cookies for the "
     "authentication. See  https://github.com/yt-dlp/yt-dlp/wiki/FAQ#how-do-i-pass-cookies-to-yt-dlp  for how to manually "
     "pass cookies. Also see  https://github.com/yt-dlp/yt-dlp/wiki/Extractors#exporting-youtube-cookies  for tips on "
     "effectively exporting YouTube cookies", "sign_in_required"),
    ("ERROR: [youtube] abcdefghijk: Video unavailable. This video is no longer available because the YouTube account "
     "associated with this video has been terminated.", "video_unavailable"),
    ("ERROR: [youtube] abcdefghijk: Video unavailable", "video_unavailable"),
    ("ERROR: [youtube] abcdefghijk: Private video. Sign in if you've been granted access to this video", "private_video"),
    ("ERROR: [youtube] abcdefghijk: Sign in to confirm your age. This video may be inappropriate for some users. Use "
     "--cookies-from-browser or --cookies for the authentication.", "age_restricted"),
    ("ERROR: [youtube] abcdefghijk: Unable to download API page: <urlopen error [Errno -2] Name or service not known> "
     "(caused by TransportError('<urlopen error [Errno -2] Name or service not known>'))", "dns_error"),
    ("ERROR: [youtube] abcdefghijk: Unable to download webpage: HTTP Error 429: Too Many Requests (caused by "
     "<HTTPError 429: Too Many Requests>)", "http_429"),
    ("[Errno 2] No such file or directory: '/tmp/v2d/1f0c.mp4'", "download_error"),
]


@pytest.mark.parametrize("message,reason", MESSAGES)
def test_real_messages_get_their_reason(message, reason):
    assert classify_error(message) == reason


def test_the_guards_record_gives_the_detail_and_never_overrides_a_specific_message():
    assert reason_detail("HTTP Error 403: Opted Out By X-Robots-Tag", ("opted_out", "X-Robots-Tag: noai")) == \
        ("opted_out", "X-Robots-Tag: noai")
    assert reason_detail("Remote end closed", ("dns_error", "x.invalid does not resolve")) == ("dns_error", "x.invalid does not resolve")
    # a 404 of one URL is not turned into another request's connection failure on the same host
    assert reason_detail("HTTP Error 404: Not Found", ("connection_error", "reset")) == ("http_404", "HTTP Error 404: Not Found")


def test_details_are_readable():
    msg = "ERROR: [youtube] abcdefghijk: Video unavailable. This video is private"
    assert readable_detail(msg) == "Video unavailable. This video is private"
    assert "/tmp" not in readable_detail("[Errno 2] No such file or directory: '/tmp/v2d/1f0c.mp4'")


@pytest.mark.parametrize("values,want", [
    (["noai"], "noai"),
    (["noindex, nofollow"], "noindex"),
    (["NoImageAI"], "noimageai"),
    (["otherbot: noai"], None),
    (["mllm-pipeline: noai"], "noai"),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
    (["nofollow", "noarchive"], None),
])
def test_x_robots_tag_parsing(values, want):
    assert robots_opt_out(values, frozenset({"noai", "noimageai", "noindex", "noimageindex"}), "mllm-pipeline") == want
