"""What every media shard records about every sample it was given: success, or failure with a named reason.

The per-sample status table (``samples.parquet`` in each media shard) has one row per raw row of the shard, so
``attempted == succeeded + sum(failed by reason)`` holds by construction and a retry can merge results by
``sample_id`` without duplicating or losing a sample.

Failure reasons (the ``reason`` column; ``detail`` keeps the downloader's own message) are :data:`REASONS`, plus
``http_<code>`` for any other HTTP status (``http_404``, ``http_500``, ...); ``http_403`` and ``http_429`` are in
the table because they say more than their status.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import pyarrow as pa

from mllm_pipeline.download.guard.proxy import FAILURE_MARKERS, REFUSED_MARKER

SUCCESS = "success"

#: Every failure reason but the other ``http_<code>``, with what it means (the UI's reason tables show these).
REASONS: dict[str, str] = {
    "timeout": "no complete answer within the configured timeout; retried",
    "truncated": "the connection closed before the announced body was complete",
    "not_media": "an answer that is not an image / video (an HTML page with status 200, text, ...)",
    "decode_error": "media bytes that do not decode (corrupt image; video without a decodable stream or with a zero "
                    "duration)",
    "refused_url": "the URL policy refused the URL or a redirect target (scheme, loopback, private, link-local, "
                   "multicast or reserved address)",
    "opted_out": "the publisher opted out: an X-Robots-Tag directive in disallowed_header_directives (noai, "
                 "noimageai, noindex, noimageindex by default); detail names it",
    "dns_error": "the host does not resolve",
    "connection_error": "connection refused, reset or unreachable; retried",
    "tls_error": "the TLS handshake failed (certificate not trusted, wrong host, protocol error)",
    "http_403": "HTTP 403 Forbidden; from YouTube's video servers usually a stream URL yt-dlp could not sign (no "
                "usable JavaScript runtime, an outdated yt-dlp) or a blocked address; retried",
    "http_429": "HTTP 429 Too Many Requests: rate limited (the guard waits for Retry-After); retried; per_host_rate "
                "slows the run down",
    "rate_limited": "YouTube rate-limited the session (\"This content isn't available, try again later\"), for up to "
                    "an hour; retried; per_host_rate slows the run down",
    "sign_in_required": "YouTube asks to sign in to confirm you're not a bot, or to solve a captcha (a cookies file "
                        "helps)",
    "age_restricted": "YouTube asks to sign in to confirm your age (an age-restricted video); only cookies of an "
                      "age-verified account get it; not retried",
    "private_video": "YouTube says the video is private; not retried",
    "video_unavailable": "YouTube says the video is unavailable or removed (deleted, terminated account, "
                         "copyright claim); not retried",
    "filtered": "the downloader's own size / aspect filters rejected it",
    "body_too_large": "the response body is over the medium's max_body_mb (by its Content-Length, or counted as it "
                      "arrived, chunked or not); the fetch stopped there; not retried",
    "deadline_exceeded": "the whole response (connect, headers and body) was not complete within deadline_s, however "
                         "steadily bytes dripped in; retried",
    "too_many_pixels": "an image whose header declares more than max_pixels pixels; refused before it was decoded; "
                       "not retried",
    "missing_file": "a local media path that does not exist",
    "download_error": "anything else (detail has the message)",
}
FAILED = "failed"

STATUS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),  # the row's position in its raw shard
        pa.field("key", pa.string()),  # the webdataset key of the stored media (successes only)
        pa.field("ext", pa.string()),  # the stored media file's extension (jpg, png, mp4 ...), successes only
        pa.field("status", pa.string(), nullable=False),  # success | failed
        pa.field("reason", pa.string()),  # failure reason (see the module doc); null on success
        pa.field("detail", pa.string()),  # the downloader's message
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("duration_s", pa.float64()),  # videos
        pa.field("bytes", pa.int64()),
        pa.field("attempts", pa.int16(), nullable=False),  # how many materializations tried this sample
    ]
)

_HTTP = re.compile(r"HTTP Error (\d{3})|status code:? (\d{3})|(\d{3}) (?:Client|Server) Error", re.IGNORECASE)


def classify_error(message: str | None) -> str:
    """Map a downloader's error message (img2dataset, video2dataset, requests, yt-dlp, the guard proxy's answers)
    to a reason."""
    msg = message or ""
    low = msg.lower()
    if any(s in low for s in _PIXELS):
        return "too_many_pixels"
    if REFUSED_MARKER.lower() in low or "refused_scheme" in low or "refused_address" in low:
        return "refused_url"
    for marker, reason in FAILURE_MARKERS.items():  # the guard proxy's own answers name the failure
        if marker.lower() in low:
            return reason
    if "x-robots-tag" in low:
        return "opted_out"
    # YouTube's playability reasons, as yt-dlp reports them (_PRIVATE, _AGE, _UNAVAILABLE below); age before the bot
    # check: both start "Sign in to confirm"
    if any(s in low for s in _PRIVATE):
        return "private_video"
    if any(s in low for s in _AGE):
        return "age_restricted"
    if "sign in to confirm" in low or "not a bot" in low or "captcha challenge" in low:
        return "sign_in_required"
    if "rate-limited by youtube" in low or "available, try again later" in low:
        return "rate_limited"
    if any(s in low for s in _UNAVAILABLE):
        return "video_unavailable"
    m = _HTTP.search(msg)
    if m:
        return f"http_{next(g for g in m.groups() if g)}"
    if any(s in low for s in _DNS):
        return "dns_error"
    if any(s in low for s in _TLS):
        return "tls_error"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "incompleteread" in low or "incomplete read" in low or "truncated" in low or "connection broken" in low:
        return "truncated"
    if "decoding error" in low or "cannot identify image" in low or "not an image" in low or "not media" in low:
        return "not_media"
    if "image too small" in low or "area too large" in low or "aspect ratio too large" in low:
        return "filtered"
    if any(s in low for s in _CONNECTION):
        return "connection_error"
    return "download_error"


# yt-dlp/extractor/youtube/_video.py raises YouTube's own playabilityStatus reason (and subreason), adding the
# cookies hint to those with "sign in"; its age-gate markers (_is_agegated) are 'confirm your age', 'age-restricted'
# and 'inappropriate'.
_PRIVATE = ("private video", "this video is private", "video is private")
_AGE = ("confirm your age", "age-restricted", "age restricted", "inappropriate for some users", "age verification")
_UNAVAILABLE = ("video unavailable", "this video is not available", "this video has been removed",
                "this video is no longer available", "has been terminated", "this video isn't available anymore")
# OpenCV's refusal under OPENCV_IO_MAX_IMAGE_PIXELS (img2dataset's resizer); Pillow's decompression-bomb error
_PIXELS = ("cv_io_max_image_pixels", "decompression bomb", "could be decompression bomb")
_DNS = ("name or service not known", "temporary failure in name resolution", "nodename nor servname",
        "no address associated with hostname", "getaddrinfo failed", "failed to resolve", "name resolution",
        "errno -2]", "errno -3]", "errno -5]")
_TLS = ("certificate_verify_failed", "certificate verify failed", "sslerror", "ssl:", "[ssl", "tlsv1 alert",
        "wrong version number", "handshake failure", "hostname mismatch")
_CONNECTION = ("connection refused", "reset by peer", "no route to host", "network is unreachable",
               "connection aborted", "remote end closed connection", "failed to establish a new connection",
               "urlopen error", "errno 111]", "errno 104]", "errno 113]")


def reason_detail(message: str | None, verdict: tuple[str, str] | None) -> tuple[str, str | None]:
    """(reason, detail) of a failure from the downloader's message; when the guard proxy recorded the same failure
    for the URL (it saw it first hand: the directive, the resolver's or TLS library's words), its detail, and its
    reason where the message alone says nothing more specific."""
    reason = classify_error(message)
    if verdict is not None and (reason in (verdict[0], "download_error")
                                or (verdict[0] in LIMIT_REASONS and reason in _CUT_OFF)):
        return verdict[0], verdict[1]
    if reason == "too_many_pixels" and "cv_io_max_image_pixels" in (message or "").lower():
        return reason, "over max_pixels: OpenCV refused to decode it (OPENCV_IO_MAX_IMAGE_PIXELS)"
    return reason, _guard_detail(message) or message


#: reasons a guard proxy records when it cuts a response off, which the client only sees as a cut-off body
LIMIT_REASONS = frozenset({"body_too_large", "deadline_exceeded"})
#: what a client makes of a response the proxy cut off (a short body, a closed connection, bytes that do not decode)
_CUT_OFF = frozenset({"truncated", "connection_error", "timeout", "not_media", "decode_error"})

_URLOPEN = re.compile(r"^<urlopen error (.*)>$", re.S)


def _guard_detail(message: str | None) -> str | None:
    """The detail of a guard's own answer as the downloader reported it (the inline guard's errors reach
    img2dataset as ``<urlopen error <marker>: <detail>>``), else None."""
    m = _URLOPEN.match(message or "")
    inner = m.group(1) if m else (message or "")
    for marker in (REFUSED_MARKER, *FAILURE_MARKERS):
        if inner.startswith(marker + ": "):
            return inner[len(marker) + 2:]
    return None


def summarize(status: pa.Table) -> dict:
    """attempted / succeeded / failed-by-reason of a status table."""
    statuses = status.column("status").to_pylist()
    reasons = Counter(r for s, r in zip(statuses, status.column("reason").to_pylist()) if s != SUCCESS)
    succeeded = sum(1 for s in statuses if s == SUCCESS)
    attempted = len(statuses)
    return {
        "attempted": attempted,
        "succeeded": succeeded,
        "failed": attempted - succeeded,
        "failed_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "success_rate": (succeeded / attempted) if attempted else 1.0,
    }


def merge_totals(summaries: Iterable[dict]) -> dict:
    total = {"attempted": 0, "succeeded": 0, "failed": 0, "failed_by_reason": Counter()}
    for s in summaries:
        for k in ("attempted", "succeeded", "failed"):
            total[k] += s[k]
        total["failed_by_reason"].update(s["failed_by_reason"])
    total["failed_by_reason"] = dict(total["failed_by_reason"].most_common())
    total["success_rate"] = total["succeeded"] / total["attempted"] if total["attempted"] else 1.0
    return total
