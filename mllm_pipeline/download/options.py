"""Checks of the download options, and which failures the options (not the URLs) caused.

**Ranges.** Every numeric option of the image and video fetchers is checked when its options object is made
(:class:`~mllm_pipeline.download.images.ImageOptions`, :class:`~mllm_pipeline.download.videos.VideoOptions`,
:class:`ShardRunOptions`), before anything is read or fetched. A value out of range raises :class:`OptionError`
(a ``ValueError``) naming the option, the value and the allowed range::

    image_size: -100 is out of range; allowed: 16 to 16383 (pixels)

**Failures caused by the options.** Some failures say nothing about the URL: every row was ``refused_url``
because loopback was not allowed, or ``timeout`` because ``timeout_s`` was 1. The options that decide whether a URL
can be fetched at all (:data:`FETCH_OPTION_NAMES`) are not part of a media shard's identity (changing them must not
re-fetch what succeeded), so a shard records the values it was fetched with (``fetch_options`` in its manifest).
:func:`refetch_reasons` says which failure reasons of a committed shard depend on an option whose value changed
since (:data:`CAUSED_BY`): those rows, and only those, are fetched again.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


class OptionError(ValueError):
    """A download option out of its allowed range (the message names the option, the value and the range)."""


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, integer: bool = True,
                lo_open: bool = False, unit: str = "", why: str = "") -> None:
    """Raise :class:`OptionError` unless ``lo <= value <= hi`` (``lo < value`` with ``lo_open``), and ``value`` is
    an integer when ``integer``, a finite number otherwise."""
    if lo is not None and hi is not None:
        allowed = f"{lo:g} to {hi:g}" if not lo_open else f"more than {lo:g} and at most {hi:g}"
    elif lo is not None:
        allowed = f"{'more than' if lo_open else 'at least'} {lo:g}"
    else:
        allowed = f"at most {hi:g}"
    if unit:
        allowed += f" ({unit})"
    if why:
        allowed += f"; {why}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and not float(value).is_integer():
        allowed, ok = "a whole number, " + allowed, False
    if ok:
        ok = (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        raise OptionError(f"{name}: {value!r} is out of range; allowed: {allowed}")


def check_header_value(name: str, value: str | None) -> None:
    """A value sent as an HTTP header (``user_agent``): printable, one line, not empty."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise OptionError(f"{name}: {value!r} is not allowed; allowed: a non-empty line of printable characters "
                          "(it is sent as an HTTP header)")


#: Limits shared by the image and video fetchers.
MAX_PROCESSES = 1024
MAX_THREADS = 1024
MAX_TIMEOUT_S = 3600
MAX_RETRIES = 20


def check_common(processes: int, threads: int, timeout_s: float, per_host_rate: float | None, user_agent: str | None) -> None:
    check_range("processes", processes, 1, MAX_PROCESSES, unit="downloader processes")
    check_range("threads", threads, 1, MAX_THREADS, unit="threads per process")
    check_range("timeout_s", timeout_s, 1, MAX_TIMEOUT_S, unit="seconds per request")
    if per_host_rate is not None:
        check_range("per_host_rate", per_host_rate, 0, 10_000, integer=False, lo_open=True,
                    unit="requests per second per host; leave it unset for no limit")
    check_header_value("user_agent", user_agent)


class ShardRunOptions:
    """The per-run options of a media asset that are not the fetcher's: checked like the fetcher's."""

    def __init__(self, min_success_rate: float = 0.5, parallel_shards: int = 1, retries: int | None = None):
        check_range("min_success_rate", min_success_rate, 0, 1, integer=False, unit="a share of the shard's rows")
        check_range("parallel_shards", parallel_shards, 1, 64, unit="shards fetched at the same time")
        if retries is not None:
            check_range("retries", retries, 0, MAX_RETRIES, unit="retries per URL within one run")
        self.min_success_rate, self.parallel_shards, self.retries = min_success_rate, parallel_shards, retries


# -- failures caused by the options -------------------------------------------------------------------------

#: The fetch options that decide whether a URL can be fetched at all (recorded per shard as ``fetch_options``).
FETCH_OPTION_NAMES = ("allow_loopback", "timeout_s", "retries", "user_agent", "per_host_rate", "deadline_s",
                      "max_body_mb", "max_pixels", "yt_dlp_params")

#: failure reason -> the fetch options that can change it. A reason not here (http_404, not_media, decode_error,
#: dns_error, tls_error, ...) is the URL's or the server's doing and is only re-fetched by ``retry_failed``.
CAUSED_BY: dict[str, tuple[str, ...]] = {
    "refused_url": ("allow_loopback",),
    "timeout": ("timeout_s", "retries"),
    "connection_error": ("timeout_s", "retries"),
    "deadline_exceeded": ("deadline_s", "retries"),
    # the size limits refuse what a URL serves; raising one fetches again only the rows it refused (they are not
    # part of the shard's identity: a new limit never re-fetches what was stored)
    "body_too_large": ("max_body_mb",),
    "too_many_pixels": ("max_pixels",),
    "http_429": ("per_host_rate", "user_agent", "retries"),
    "rate_limited": ("per_host_rate", "yt_dlp_params"),
    "http_403": ("user_agent", "yt_dlp_params"),
    "sign_in_required": ("yt_dlp_params",),
    "age_restricted": ("yt_dlp_params",),
}


def digest_value(value: Any) -> str:
    """A short digest standing for a value that may hold secrets (yt-dlp options: cookie files, a proxy URL)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def refetch_reasons(failed_by_reason: dict[str, int], recorded: dict[str, Any] | None,
                    current: dict[str, Any] | None) -> dict[str, list[str]]:
    """reason -> the options (among those it depends on) whose value differs between ``recorded`` (what the
    committed shard was fetched with) and ``current``, for each failure reason of the shard with such an option.
    Empty when nothing is to be fetched again: no such failure, nothing recorded (a shard committed before fetch
    options were recorded), or no relevant option changed. An option missing on either side is not compared."""
    if not recorded or not current:
        return {}
    out: dict[str, list[str]] = {}
    for reason, n in (failed_by_reason or {}).items():
        if not n:
            continue
        changed = [o for o in CAUSED_BY.get(reason, ()) if o in recorded and o in current and recorded[o] != current[o]]
        if changed:
            out[reason] = changed
    return out
