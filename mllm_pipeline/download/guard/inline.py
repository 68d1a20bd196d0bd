"""The URL guard inside the downloader's own processes: urllib handlers that check every connection at the socket.

:class:`~mllm_pipeline.download.guard.proxy.GuardProxy` relays every byte through one more loopback hop (and over
HTTPS a second TLS session), which costs about 0.9 ms of CPU per image over HTTP and 3.3 ms over HTTPS. img2dataset
fetches with ``urllib.request.urlopen``, which uses the process's installed opener, so the same policy can run
where the request is made, at no per-byte cost. :func:`install` installs an opener whose handlers:

* resolve the host and check *every* address it resolves to with
  :class:`~mllm_pipeline.download.guard.url_policy.UrlPolicy`, then connect to the checked address (what is checked is
  what is connected to: no DNS-rebinding gap). This runs for every request and every redirect (urllib opens each
  redirect through the handlers again); a redirect to a scheme the policy does not allow is refused first;
* verify TLS with one context per process, built from the trust store of the process that started the download
  (``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE`` / certifi), with SNI and host-name checks for the real host name;
* set the ``User-Agent`` of every request when one is configured;
* space requests to one host by ``per_host_rate``: the slots are a table in a memory-mapped file shared by every
  worker process of the run (indexed by a hash of the host; two hosts sharing an entry share a slot, which only
  errs on the polite side), each entry locked with a byte-range ``lockf``;
* retry a ``429 Too Many Requests`` after ``Retry-After`` (or an exponential back-off), per request;
* refuse a response whose ``X-Robots-Tag`` carries a refused directive (the same parsing rule as the proxy and
  img2dataset) and name the directive;
* name DNS, connection, timeout and TLS failures with the proxy's markers (``Guard DNS Failure: <detail>`` ...),
  so :func:`~mllm_pipeline.download.accounting.reason_detail` gives the same reasons and details for both guards;
* bound every response (``max_body_bytes``, ``deadline_s``): the response reads through a counting reader whose
  socket timeout is never longer than what is left of the deadline, so a ``2xx`` with a ``Content-Length`` over the
  limit fails before its body is read, a body fails as soon as it passes the limit (chunked or not), and a response
  not complete by the deadline (connect, TLS, headers and body together: a drip of one byte a second is cut off too)
  fails with ``Guard Body Too Large`` / ``Guard Deadline Exceeded``; a URL found too large is not fetched again by
  the downloader's own retry. Memory per request is bounded by the limit, whatever the server sends.

The parent side is :class:`InlineGuard`: a context manager that makes the run's scratch folder (the rate-limit
table, and the statistics each worker process writes after each of its shards) and reads them back with the same
``stats`` / ``cpu_seconds`` / ``sync()`` / ``verdict()`` surface as the proxy. It does not route through an egress
proxy of the user's (urllib's proxy variables are ignored by this opener); the ``proxy`` guard does.

No library provides an SSRF-checking urllib opener; this module is small and leans on ``urllib`` and
``http.client`` for everything but the check and the politeness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import http.client
import io
import ipaddress
import json
import mmap
import os
import shutil
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import Counter
from urllib.parse import urljoin, urlsplit

from mllm_pipeline.download.guard.proxy import (
    DEFAULT_DISALLOWED_DIRECTIVES,
    OPTED_OUT_MARKER,
    REFUSED_MARKER,
    ProxyStats,
    retry_delay,
    robots_opt_out,
)
from mllm_pipeline.download.guard.url_policy import UrlPolicy

#: entries of the shared per-host rate-limit table (8 bytes each)
SLOTS = 4096


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    """What a worker process needs to guard its requests (picklable: it travels to spawned workers)."""

    policy: UrlPolicy
    run_dir: str
    user_agent: str | None = None
    per_host_rate: float | None = None
    retries_on_429: int = 3
    backoff_s: float = 1.0
    directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES
    trust: tuple[str, ...] = ()
    max_body_bytes: int | None = None  # bytes of one response body; None: unlimited
    deadline_s: float | None = None  # seconds for one whole response (per attempt); None: none

    @property
    def agent_token(self) -> str | None:
        return (self.user_agent or "").split("/", 1)[0].strip().lower() or None


class GuardError(OSError):
    """A guard's answer: ``str()`` is ``"<marker>: <detail>"``. An OSError, so urllib wraps it in a URLError like
    any connection failure (the downloader records ``<urlopen error <marker>: <detail>>``)."""


class InlineGuard:
    """``with InlineGuard(policy, ...) as guard:`` then :meth:`settings` goes to the worker processes (see
    :func:`install`); ``guard.sync()`` reads back what they counted."""

    def __init__(self, policy: UrlPolicy, *, user_agent: str | None = None, per_host_rate: float | None = None,
                 disallowed_directives: tuple[str, ...] | list[str] = DEFAULT_DISALLOWED_DIRECTIVES,
                 retries_on_429: int = 3, backoff_s: float = 1.0, work_dir: str | None = None,
                 max_body_bytes: int | None = None, deadline_s: float | None = None):
        self.policy = policy
        self._kwargs = dict(user_agent=user_agent, per_host_rate=per_host_rate, retries_on_429=retries_on_429,
                            backoff_s=backoff_s, directives=tuple(d.strip().lower() for d in disallowed_directives),
                            max_body_bytes=max_body_bytes or None, deadline_s=deadline_s or None)
        self._work_dir = work_dir
        self._run_dir: str | None = None
        self.settings: GuardSettings | None = None
        self.stats = ProxyStats()
        self.cpu_seconds: float | None = None

    def __enter__(self) -> InlineGuard:
        from mllm_pipeline.download.guard.tls_intercept import trust_store_files

        from mllm_pipeline.storage import make_scratch_dir

        self._run_dir = make_scratch_dir("mllm-guard-", self._work_dir)  # a killed run's goes with the next run
        os.makedirs(os.path.join(self._run_dir, "stats"))
        with open(os.path.join(self._run_dir, "slots"), "wb") as f:
            f.write(bytes(8 * SLOTS))
        self.settings = GuardSettings(self.policy, self._run_dir, trust=tuple(trust_store_files()), **self._kwargs)
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def sync(self) -> None:
        """Sum the statistics every worker process wrote so far (each writes its totals after each shard)."""
        if self._run_dir is None:
            return
        stats, cpu = ProxyStats(), 0.0
        folder = os.path.join(self._run_dir, "stats")
        for name in os.listdir(folder):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(folder, name)) as f:
                    one = json.load(f)
            except (OSError, ValueError):
                continue  # being replaced right now: its next version is read by the next sync
            stats.requests += one["requests"]
            stats.retried_429 += one["retried_429"]
            stats.refused.update(one["refused"])
            stats.failed.update(one["failed"])
            cpu += one["cpu_s"]
        self.stats, self.cpu_seconds = stats, cpu

    def verdict(self, url: str, max_hops: int = 10) -> tuple[None, None]:
        """Nothing is recorded per URL: the downloader's own message carries the guard's marker and detail."""
        return None, None


# -- inside a worker process ----------------------------------------------------------------------------------
_LOCK = threading.Lock()
_STATE: _Worker | None = None


def install(settings: GuardSettings) -> None:
    """Make ``urllib.request.urlopen`` in this process go through the guard (idempotent per run)."""
    global _STATE
    with _LOCK:
        if _STATE is not None and _STATE.settings == settings:
            return
        _STATE = _Worker(settings)
        urllib.request.install_opener(_STATE.opener)


def write_stats() -> None:
    """This process's totals into the run's folder (replaced atomically; the parent sums the files)."""
    if _STATE is not None:
        _STATE.write_stats()


class _Worker:
    def __init__(self, settings: GuardSettings):
        from mllm_pipeline.download.guard.tls_intercept import upstream_context

        self.settings = settings
        self.min_interval = 1.0 / settings.per_host_rate if settings.per_host_rate else 0.0
        self.directives = frozenset(settings.directives)
        self.lock = threading.Lock()
        self.requests = 0
        self.retried_429 = 0
        self.refused: Counter = Counter()
        self.failed: Counter = Counter()
        self.cpu_s = 0.0
        self.too_large: dict[str, str] = {}  # url -> detail: not fetched again by the downloader's retry
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self._slots_fd = os.open(os.path.join(settings.run_dir, "slots"), os.O_RDWR) if self.min_interval else None
        self._slots = mmap.mmap(self._slots_fd, 8 * SLOTS) if self._slots_fd is not None else None
        self._slot_lock = threading.Lock()  # lockf excludes other processes, not this process's threads
        context = upstream_context(list(settings.trust))
        self.opener = urllib.request.OpenerDirector()
        for handler in (_HTTPHandler(self), _HTTPSHandler(self, context), _RedirectHandler(self),
                        urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                        urllib.request.UnknownHandler()):
            self.opener.add_handler(handler)

    def count(self, what: str | None, key: str | None = None, since: float | None = None) -> None:
        """Count one event (``None``: none) and, with ``since`` (a ``thread_time()``), the guard's CPU since then."""
        with self.lock:
            if what == "request":
                self.requests += 1
            elif what == "retried_429":
                self.retried_429 += 1
            elif what == "refused":
                self.refused[key] += 1
            elif what is not None:
                self.failed[key] += 1
            if since is not None:
                self.cpu_s += time.thread_time() - since

    def write_stats(self) -> None:
        with self.lock:
            data = {"requests": self.requests, "retried_429": self.retried_429, "refused": dict(self.refused),
                    "failed": dict(self.failed), "cpu_s": self.cpu_s}
        folder = os.path.join(self.settings.run_dir, "stats")
        if not os.path.isdir(folder):
            return  # the run is over (a worker outliving it)
        tmp = os.path.join(folder, self.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(folder, self.name))

    def fail(self, marker: str, reason: str, detail: str) -> GuardError:
        if marker == REFUSED_MARKER:
            self.count("refused", detail.split(":", 1)[0])
        else:
            self.count("failed", reason)
        return GuardError(f"{marker}: {detail}")

    # -- checks ------------------------------------------------------------------------------------------------
    def connect(self, address: tuple[str, int], timeout, source_address=None, limits: _Limits | None = None) -> socket.socket:
        """``socket.create_connection`` for http.client: resolve, check every address, connect to a checked one
        (within what is left of the deadline of ``limits``)."""
        host, port = address
        if limits is not None and limits.deadline is not None:
            left = limits.left()
            timeout = left if not isinstance(timeout, (int, float)) else min(timeout, left)
        try:
            addresses = [str(ipaddress.ip_address(host))]  # an IP literal: no resolver round trip
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise self.fail("Guard DNS Failure", "dns_error", f"{host} does not resolve ({e.strerror or e})") from None
            addresses = list(dict.fromkeys(i[4][0] for i in infos))
        t0 = time.thread_time()
        why = self.settings.policy.addresses_refusal(host, addresses)
        if why:
            raise self.fail(REFUSED_MARKER, "refused_url", why)
        self.count("request", since=t0)
        if not addresses:
            raise self.fail("Guard DNS Failure", "dns_error", f"{host} resolves to no address")
        *others, last = addresses
        for addr in others:  # every one was checked; the first that answers is used
            with contextlib.suppress(OSError):
                return socket.create_connection((addr, port), timeout, source_address)
        where = f"{host}:{port}" + (f" ({last})" if last != host else "")
        try:
            return socket.create_connection((last, port), timeout, source_address)
        except TimeoutError:
            if limits is not None and limits.expired():
                raise limits.late(0) from None
            raise self.fail("Guard Upstream Timeout", "timeout", f"{where}: no connection within {timeout}s") from None
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            raise self.fail("Guard Connection Failed", "connection_error", f"{where}: {why}") from None

    def wait_turn(self, host: str) -> None:
        if not self.min_interval:
            return
        t0 = time.thread_time()
        offset = 8 * (zlib.crc32(host.encode("utf-8", "replace")) % SLOTS)
        with self._slot_lock:
            fcntl.lockf(self._slots_fd, fcntl.LOCK_EX, 8, offset)
            try:
                now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
                slot = max(now, struct.unpack_from("d", self._slots, offset)[0])
                struct.pack_into("d", self._slots, offset, slot + self.min_interval)
            finally:
                fcntl.lockf(self._slots_fd, fcntl.LOCK_UN, 8, offset)
        self.count(None, since=t0)
        if slot > now:
            time.sleep(slot - now)

    def open(self, handler: urllib.request.AbstractHTTPHandler, conn_class, req: urllib.request.Request, **kw):
        """One request through ``handler.do_open``: user agent, rate limit, 429 back-off, opt-out check."""
        s = self.settings
        if s.user_agent:  # in both header sets: urllib's default agent goes into the unredirected ones
            req.add_header("User-Agent", s.user_agent)
            req.add_unredirected_header("User-Agent", s.user_agent)
        host = urlsplit(req.full_url).hostname or ""
        if req.full_url in self.too_large:  # the downloader retrying a URL that was too large: the same answer
            raise self.fail("Guard Body Too Large", "body_too_large", self.too_large[req.full_url])
        for attempt in range(s.retries_on_429 + 1):
            self.wait_turn(host)
            if s.max_body_bytes or s.deadline_s:  # this attempt's limits: its own deadline, from now
                kw["limits"] = _Limits(self, req.full_url, s.max_body_bytes, s.deadline_s)
            resp = handler.do_open(conn_class, req, **kw)
            if resp.status == 429 and attempt < s.retries_on_429:
                resp.close()
                self.count("retried_429")
                time.sleep(retry_delay(resp.headers.get("Retry-After"), attempt, s.backoff_s))
                continue
            if self.directives and 200 <= resp.status < 300:
                t0 = time.thread_time()
                directive = robots_opt_out(resp.headers.get_all("X-Robots-Tag") or [], self.directives, s.agent_token)
                self.count(None, since=t0)
                if directive:
                    resp.close()
                    raise urllib.error.URLError(self.fail(OPTED_OUT_MARKER, "opted_out", f"X-Robots-Tag: {directive}"))
            return resp  # the last attempt returns whatever came, a 429 included


class _Limits:
    """One attempt's limits: its deadline (``time.monotonic()``) and the most body bytes it may read."""

    __slots__ = ("worker", "url", "max_bytes", "deadline_s", "deadline")

    def __init__(self, worker: _Worker, url: str, max_bytes: int | None, deadline_s: float | None):
        self.worker, self.url, self.max_bytes, self.deadline_s = worker, url, max_bytes, deadline_s
        self.deadline = time.monotonic() + deadline_s if deadline_s else None

    def left(self) -> float:
        """Seconds left before the deadline (a deadline already passed fails here)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.late(0)
        return left

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline - 0.01

    def _where(self) -> str:
        return urlsplit(self.url).netloc

    def late(self, received: int) -> GuardError:
        return self.worker.fail("Guard Deadline Exceeded", "deadline_exceeded",
                                f"{self._where()}: response not complete within the deadline of {self.deadline_s:g}s"
                                + (f"; cut off at {received} bytes" if received else ""))

    def too_large(self, what: str) -> GuardError:
        detail = f"{self._where()}: {what}"
        if len(self.worker.too_large) < 10_000:
            self.worker.too_large[self.url] = detail
        return self.worker.fail("Guard Body Too Large", "body_too_large", detail)


class _LimitedRaw(io.RawIOBase):
    """The response's socket reader, within the attempt's limits: each read waits at most the socket timeout and
    never past the deadline, and the bytes read are counted against the body limit."""

    def __init__(self, inner: io.RawIOBase, sock: socket.socket, limits: _Limits):
        self._inner, self._sock, self._limits = inner, sock, limits
        self._timeout = sock.gettimeout()  # the per-read timeout the downloader asked for
        self.received = 0
        self.body_from = 0  # bytes before the body (the head, give or take what was buffered with it)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        lim = self._limits
        if lim.deadline is not None:
            left = lim.deadline - time.monotonic()
            if left <= 0:
                raise lim.late(self.received - self.body_from)
            self._sock.settimeout(left if self._timeout is None else min(self._timeout, left))
        try:
            n = self._inner.readinto(b)
        except TimeoutError:
            if lim.expired():
                raise lim.late(self.received - self.body_from) from None
            raise
        if n:
            self.received += n
            if lim.max_bytes and self.received - self.body_from > lim.max_bytes:
                raise lim.too_large(f"body over the limit of {lim.max_bytes} bytes; cut off at "
                                    f"{self.received - self.body_from} bytes")
        return n

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


class _LimitedResponse(http.client.HTTPResponse):
    """An HTTP response read through :class:`_LimitedRaw` (head and body); a ``2xx`` whose ``Content-Length`` is
    over the limit fails before its body is read."""

    def __init__(self, sock, debuglevel=0, method=None, url=None, *, limits: _Limits):
        super().__init__(sock, debuglevel, method, url)
        self._limits = limits
        self._raw = _LimitedRaw(self.fp.detach(), sock, limits)  # nothing has been read through self.fp yet
        self.fp = io.BufferedReader(self._raw)

    def begin(self) -> None:
        super().begin()
        self._raw.body_from = self._raw.received
        lim = self._limits
        if (lim.max_bytes and 200 <= self.status < 300 and self._method != "HEAD" and self.length is not None
                and self.length > lim.max_bytes):
            raise lim.too_large(f"Content-Length {self.length} bytes, over the limit of {lim.max_bytes} bytes")


class _HTTPSConnection(http.client.HTTPSConnection):
    _worker: _Worker
    _limits: _Limits | None = None

    def connect(self) -> None:
        where = f"{self.host}:{self.port}"
        try:
            super().connect()
        except TimeoutError:  # the TLS handshake: within the socket timeout, which the deadline caps
            if self._limits is not None and self._limits.expired():
                raise self._limits.late(0) from None
            raise
        except ssl.SSLCertVerificationError as e:
            raise self._worker.fail("Guard TLS Failure", "tls_error",
                                    f"{where}: certificate not trusted ({e.verify_message})") from None
        except ssl.SSLError as e:
            raise self._worker.fail("Guard TLS Failure", "tls_error", f"{where}: TLS handshake failed ({e.reason or e})") from None


def _bound(base: type, worker: _Worker) -> type:
    """A connection class whose connections go through ``worker``'s check (http.client sets
    ``_create_connection`` per instance, so it is replaced after ``__init__``)."""

    def __init__(self, *args, limits: _Limits | None = None, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._create_connection = worker.connect if limits is None else functools.partial(worker.connect, limits=limits)
        if limits is not None:
            self._limits = limits
            self.response_class = functools.partial(_LimitedResponse, limits=limits)

    return type(base.__name__, (base,), {"_worker": worker, "__init__": __init__})


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, worker: _Worker):
        super().__init__()
        self._worker, self._conn = worker, _bound(http.client.HTTPConnection, worker)

    def http_open(self, req):
        return self._worker.open(self, self._conn, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, worker: _Worker, context: ssl.SSLContext):
        super().__init__(context=context)
        self._worker, self._conn = worker, _bound(_HTTPSConnection, worker)

    def https_open(self, req):
        return self._worker.open(self, self._conn, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, worker: _Worker):
        self._worker = worker

    def http_error_302(self, req, fp, code, msg, headers):
        """A redirect to a scheme the policy does not allow is a refusal (urllib's own answer is an HTTP error)."""
        location = headers.get("location") or headers.get("uri")
        if location:
            scheme = urlsplit(urljoin(req.full_url, location)).scheme.lower()
            if scheme not in self._worker.settings.policy.allowed_schemes:
                fp.close()
                raise urllib.error.URLError(self._worker.fail(REFUSED_MARKER, "refused_url",
                                                              f"refused_scheme: {scheme or '(none)'} (redirect to {location[:200]})"))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

