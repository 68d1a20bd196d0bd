"""A small forward HTTP(S) proxy on loopback that enforces the URL policy for any downloader.

img2dataset (urllib), video2dataset (requests, yt-dlp) and ffmpeg all honour ``http_proxy`` / ``https_proxy``.
Pointing them at this proxy gives one place where, for every request *and every redirect* (each redirect is a
new request through the proxy), over HTTP and HTTPS alike:

* the target is resolved once and checked with :class:`~mllm_pipeline.download.guard.url_policy.UrlPolicy`, and the
  connection goes to the very address that was checked (no DNS-rebinding gap); a refused target gets
  ``403 Refused By URL Policy`` and is recorded with its reason;
* requests to one host are spaced by a per-host rate limit;
* a ``429 Too Many Requests`` is retried after a back-off (``Retry-After`` when the server sends one);
* the ``User-Agent`` can be set for every request;
* a response whose ``X-Robots-Tag`` carries a refused directive (``noai``, ``noimageai`` ...) is replaced by
  ``403 Opted Out By X-Robots-Tag`` and recorded with the directive, whatever the downloader;
* a host that does not resolve, refuses the connection, does not answer in time or fails TLS verification gets a
  ``502`` / ``504`` whose reason phrase names the failure (``Guard DNS Failure``, ``Guard Connection Failed``,
  ``Guard TLS Failure``, ``Guard Upstream Timeout``), so the downloader's own error message carries it, and the
  proxy records the full detail;
* limits on every response (``max_body_bytes``, ``deadline_s``): a ``2xx`` whose ``Content-Length`` is over the
  limit gets ``502 Guard Body Too Large``; a body that grows past it as it arrives, or a response not complete
  within the deadline (connect, headers and body together, however steadily bytes drip in), is cut off and recorded
  as ``body_too_large`` / ``deadline_exceeded`` (before the headers: ``504 Guard Deadline Exceeded``). Requests go
  out with ``Accept-Encoding: identity`` and a ``Content-Encoding`` is not passed on, so no client inflates more
  than the proxy counted.

HTTPS: a ``CONNECT`` is checked like any URL; then the proxy opens its own TLS connection to the host, verified
against the normal trust store, *before* it answers, so a connection or TLS failure is the answer to the
``CONNECT``. It then terminates the downloader's TLS with a certificate from a per-run CA
(:mod:`~mllm_pipeline.download.guard.tls_intercept`; :meth:`GuardProxy.env` makes the children trust it through
``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``) and handles the request inside like a plain HTTP one. With
``inspect_tls=False`` it only relays bytes after the check (then the user agent, 429 handling and opt-outs are the
downloader's business).

Cost: ``bench/guard_bench.py`` measures the CPU it takes per image (figures, with their dates, in bench/README.md
and docs/performance.md); most of it is the kernel's work for the extra loopback TCP hop (send, connect, accept),
not Python, and over HTTPS a second TLS handshake and re-encryption; one event-loop thread caps the request rate
accordingly. Names are resolved once a minute (every use re-checked against the policy) and
IP literals never reach the resolver thread, because those hand-offs were the largest Python-side cost.

``processes=N`` scales it with cores: N spawned relay processes accept from one listening socket (the kernel
spreads the connections), the per-host rate-limit slots live in shared memory so politeness stays global, and
every record comes back to this process through a queue (:meth:`GuardProxy.sync` before reading verdicts). Chosen
over threads (the GIL: relaying is one core's work however many threads) and over an external egress proxy (it
would pay the same kernel cost per byte and could not name a failure or re-classify what the downloader stored).
It raises the ceiling; it does not lower the CPU per image. For img2dataset the inline guard
(:mod:`~mllm_pipeline.download.guard.inline`) does: the same checks at the socket inside its worker processes,
relaying nothing. The proxy stays for what cannot take an opener: video2dataset's requests, yt-dlp and ffmpeg in
their own environment, and Spark executors on other machines.

No library does this for Python downloaders (the known SSRF proxies are separate Go services), hence this module;
it is deliberately small: one request per client connection, HTTP/1.1, no caching.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import socket
import ssl
import threading
import time
import zlib
from collections import Counter, defaultdict
from urllib.parse import urljoin, urlsplit

from mllm_pipeline.download.guard.url_policy import UrlPolicy

REFUSED_STATUS = b"403 Refused By URL Policy"
REFUSED_MARKER = "Refused By URL Policy"  # what a client's error message contains for a refused URL
OPTED_OUT_MARKER = "Opted Out By X-Robots-Tag"
#: reason phrases of the proxy's own failure answers -> the failure reason they stand for
FAILURE_MARKERS = {
    "Guard DNS Failure": "dns_error",
    "Guard Connection Failed": "connection_error",
    "Guard TLS Failure": "tls_error",
    "Guard Upstream Timeout": "timeout",
    OPTED_OUT_MARKER: "opted_out",
    "Guard Body Too Large": "body_too_large",
    "Guard Deadline Exceeded": "deadline_exceeded",
    "Guard Too Many Pixels": "too_many_pixels",
}
#: img2dataset's default refused X-Robots-Tag directives; the assets use the same by default
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
#: how long a resolved host name's addresses are reused (each use is checked against the policy again)
DNS_TTL_S = 60.0
#: bytes read per relay step (fewer, larger steps: the relay's cost is per step, not per byte)
RELAY_CHUNK = 1 << 18


@dataclasses.dataclass
class ProxyStats:
    requests: int = 0
    refused: Counter = dataclasses.field(default_factory=Counter)
    failed: Counter = dataclasses.field(default_factory=Counter)
    retried_429: int = 0
    refused_urls: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class _Upstream(Exception):
    """A failure to reach the real host: ``status`` (bytes) goes back to the client, ``reason``/``detail`` recorded."""

    def __init__(self, status: bytes, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


def retry_delay(retry_after: str | None, attempt: int, backoff_s: float) -> float:
    """Seconds to wait before retrying a 429: the server's ``Retry-After`` seconds, else an exponential back-off;
    at most a minute."""
    value = (retry_after or "").strip()
    return min(float(value) if value.replace(".", "", 1).isdigit() else backoff_s * 2**attempt, 60.0)


def robots_opt_out(values: list[str], directives: frozenset[str], agent_token: str | None) -> str | None:
    """The first refused directive in ``X-Robots-Tag`` header values, or None.

    A value is ``[<user agent token>:] directive, directive, ...``; a value for another user agent does not apply.
    The parsing rule is the one img2dataset uses, so both agree on what is refused."""
    for value in values:
        head, sep, rest = value.partition(":")
        token = head.strip().lower() if sep and "," not in head and " " not in head.strip() else None
        listed = rest if token is not None else value
        if token is not None and token != (agent_token or ""):
            continue
        for d in listed.split(","):
            if d.strip().lower() in directives:
                return d.strip().lower()
    return None


class GuardProxy:
    """Run with ``with GuardProxy(policy) as proxy:``; ``proxy.env()`` goes into the downloader's environment."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        user_agent: str | None = None,
        per_host_rate: float | None = None,
        retries_on_429: int = 3,
        backoff_s: float = 1.0,
        connect_timeout_s: float = 10.0,
        host: str = "127.0.0.1",
        disallowed_directives: tuple[str, ...] | list[str] = DEFAULT_DISALLOWED_DIRECTIVES,
        inspect_tls: bool = True,
        processes: int = 1,
        max_body_bytes: int | None = None,
        deadline_s: float | None = None,
    ):
        self._kwargs = dict(user_agent=user_agent, per_host_rate=per_host_rate, retries_on_429=retries_on_429,
                            backoff_s=backoff_s, connect_timeout_s=connect_timeout_s, host=host,
                            disallowed_directives=tuple(disallowed_directives), inspect_tls=inspect_tls,
                            max_body_bytes=max_body_bytes, deadline_s=deadline_s)
        self.max_body_bytes = max_body_bytes or None  # bytes of one response body; None: unlimited
        self.deadline_s = deadline_s or None  # seconds for one whole response (per attempt); None: none
        self.processes = max(1, int(processes))
        self.policy = policy
        self.host = host  # the address it listens on and advertises: loopback, or one Spark executors can reach
        self.user_agent = user_agent
        self.agent_token = (user_agent or "").split("/", 1)[0].strip().lower() or None
        self.min_interval = 1.0 / per_host_rate if per_host_rate else 0.0
        self.retries_on_429 = retries_on_429
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.directives = frozenset(d.strip().lower() for d in disallowed_directives)
        self.inspect_tls = inspect_tls
        self.stats = ProxyStats()
        self._responses: dict[str, tuple[int, str | None]] = {}
        self._verdicts: dict[str, tuple[str, str]] = {}  # url -> (reason, detail) for refusals and failures
        self._lock = threading.Lock()
        self._next_slot: dict[str, float] = defaultdict(float)
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ca = None
        self._upstream_ssl: ssl.SSLContext | None = None
        self.cpu_seconds: float | None = None  # the proxy thread's CPU time, once it has stopped
        self.url = ""
        # processes > 1: the relay processes, their control pipes, the shared rate-limit slots, the records' queue
        self._workers: list = []
        self._controls: list = []
        self._slots = None  # (also set inside a relay process)
        self._sink = None  # inside a relay process: where its records go
        self._records = None
        self._drain: threading.Thread | None = None
        self._pongs: Counter = Counter()
        self._pong_cv = threading.Condition()
        self._sync_lock = threading.Lock()
        self._sync_n = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> GuardProxy:
        from mllm_pipeline.download.guard.tls_intercept import LocalCA, upstream_context

        if self.processes > 1:
            return self._enter_processes()
        self._upstream_ssl = upstream_context()  # before env() reaches this process's environment
        if self.inspect_tls:
            self._ca = LocalCA()
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, 0, limit=1 << 16,
                                                                            backlog=1024))
                port = self._server.sockets[0].getsockname()[1]
                self.url = f"http://{self.host}:{port}"
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                errors.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            self.cpu_seconds = time.thread_time()  # this thread's CPU: what relaying and checking cost
            self._server.close()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:  # connections still open (a downloader that gave up mid-transfer)
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="guard-proxy", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]
        return self

    def __exit__(self, *exc) -> None:
        if self._workers:
            return self._exit_processes()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        if self._ca is not None:
            self._ca.close()

    def env(self, ca_only: bool = False) -> dict[str, str]:
        """Environment variables that route a child process's downloads through this proxy (and make it trust the
        proxy's per-run CA for HTTPS; ``ca_only``: that CA alone, see :meth:`LocalCA.env`)."""
        env = {"http_proxy": self.url, "https_proxy": self.url, "HTTP_PROXY": self.url, "HTTPS_PROXY": self.url,
               "no_proxy": "", "NO_PROXY": ""}
        if self._ca is not None:
            env.update(self._ca.env(ca_only))
        return env

    def outcome(self, url: str, max_hops: int = 10) -> tuple[int | None, str | None]:
        """(final HTTP status, refusal reason) of a URL fetched through this proxy, following recorded redirects."""
        status, verdict = self.verdict(url, max_hops)
        return status, (verdict[1] if verdict and verdict[0] == "refused_url" else None)

    def verdict(self, url: str, max_hops: int = 10) -> tuple[int | None, tuple[str, str] | None]:
        """(final HTTP status, (reason, detail) of a refusal, failure or opt-out) of a URL fetched through this proxy,
        following recorded redirects. Lets a caller name the real reason when a downloader stored an error page
        as if it were media, or reported only a vague error."""
        with self._lock:
            for _ in range(max_hops):
                parts = urlsplit(url)
                for key in (url, f"{parts.scheme}://{parts.netloc}"):
                    if key in self._verdicts:
                        return self._responses.get(url, (None, None))[0], self._verdicts[key]
                status, location = self._responses.get(url, (None, None))
                if status is None or not (300 <= status < 400 and location):
                    return status, None
                url = urljoin(url, location)
        return None, None

    # -- several relay processes --------------------------------------------------------------------
    # One listening socket, accepted from by ``processes`` spawned relay processes (the kernel spreads the
    # connections). What must be global is global: the per-host rate-limit slots live in shared memory (a table
    # indexed by a hash of the host; two hosts that share an entry share a slot, which only errs on the polite
    # side), and every record (statuses, redirects, verdicts) and the statistics come back to this process through
    # a queue, where verdict()/outcome() read them. sync() waits until each relay process has delivered everything
    # it recorded so far (a collector calls it before reading verdicts).
    def _enter_processes(self) -> GuardProxy:
        import multiprocessing as mp

        from mllm_pipeline.download.guard.tls_intercept import LocalCA, trust_store_files

        ctx = mp.get_context("spawn")
        if self.inspect_tls:
            self._ca = LocalCA()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(4096)
        self._listen = sock
        self.url = f"http://{self.host}:{sock.getsockname()[1]}"
        self._slots = ctx.Array("d", 4096)
        self._records = ctx.Queue()
        init = {"policy": self.policy, "kwargs": self._kwargs, "trust": trust_store_files(),
                "ca": self._ca.state() if self._ca is not None else None}
        for _ in range(self.processes):
            parent_end, child_end = ctx.Pipe()
            w = ctx.Process(target=_relay_process, args=(sock, init, self._slots, self._records, child_end),
                            name="guard-relay", daemon=True)
            w.start()
            child_end.close()
            self._workers.append(w)
            self._controls.append(parent_end)
        self._drain = threading.Thread(target=self._drain_records, name="guard-records", daemon=True)
        self._drain.start()
        for c in self._controls:  # ready: each relay process answers once its server runs
            if not c.poll(60):
                self._exit_processes()
                raise RuntimeError("a guard relay process did not start within 60 s")
            c.recv()
        return self

    def _drain_records(self) -> None:
        self.cpu_seconds = 0.0
        while True:
            item = self._records.get()
            if item is None:
                return
            kind = item[0]
            if kind == "r":
                self._record(*item[1:])
            elif kind == "n":
                self._note(*item[1:])
            elif kind == "pong":
                with self._pong_cv:
                    self._pongs[item[1]] += 1
                    self._pong_cv.notify_all()
            elif kind == "end":
                _, cpu, requests, retried = item
                with self._lock:
                    self.cpu_seconds += cpu
                    self.stats.requests += requests
                    self.stats.retried_429 += retried

    def sync(self, timeout_s: float = 30.0) -> None:
        """Wait until every relay process has delivered the records it made so far (no-op with one process)."""
        if not self._workers:
            return
        with self._sync_lock:
            self._sync_n += 1
            n = self._sync_n
            for c in self._controls:
                c.send(("sync", n))
        with self._pong_cv:
            self._pong_cv.wait_for(lambda: self._pongs[n] >= len(self._controls), timeout_s)

    def _exit_processes(self) -> None:
        for c in self._controls:
            with contextlib.suppress(OSError):
                c.send(("stop", 0))
        for w in self._workers:
            w.join(15)
            if w.is_alive():
                w.kill()
                w.join(5)
        self._records.put(None)
        if self._drain is not None:
            self._drain.join(15)
        self._listen.close()
        self._workers = []
        if self._ca is not None:
            self._ca.close()

    # -- records --------------------------------------------------------------------------------------
    def _record(self, url: str, status: int, location: str | None) -> None:
        if self._sink is not None:
            self._sink.put(("r", url, status, location))
            return
        with self._lock:
            if len(self._responses) < 1_000_000:
                self._responses[url] = (status, location)

    def _note(self, url: str, reason: str, detail: str) -> None:
        if self._sink is not None:
            self._sink.put(("n", url, reason, detail))
            return
        with self._lock:
            if len(self._verdicts) < 1_000_000:
                self._verdicts[url] = (reason, detail)
            if reason == "refused_url":
                self.stats.refused[detail.split(":", 1)[0]] += 1
                if len(self.stats.refused_urls) < 10_000:
                    self.stats.refused_urls.append((url, detail))
            else:
                self.stats.failed[reason] += 1

    def _refuse(self, url: str, reason: str) -> None:
        self._note(url, "refused_url", reason)

    # -- the proxy ------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            method, target, headers = _parse_head(head)
            with self._lock:
                self.stats.requests += 1
            if method.upper() == "CONNECT":
                await self._connect(target, reader, writer)
            else:
                await self._forward_http(method, target, headers, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError,
                asyncio.TimeoutError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host``: an IP literal as it is (no resolver round trip), a name through the resolver
        (in asyncio's executor), remembered for :data:`DNS_TTL_S` seconds (CC3M-like lists repeat a few hosts
        thousands of times). Whatever comes back is checked against the policy on every request, so a cached answer
        never skips the check."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        now = time.monotonic()
        hit = self._dns.get((host, port))
        if hit is not None and hit[0] > now:
            return hit[1]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = sorted({i[4][0] for i in infos}, key=lambda a: ipaddress.ip_address(a.split("%")[0]).version)
        if len(self._dns) > 100_000:
            self._dns.clear()
        self._dns[(host, port)] = (now + DNS_TTL_S, addresses)
        return addresses

    async def _checked_address(self, url: str, host: str, port: int) -> str:
        """Resolve ``host`` to an allowed address, or raise :class:`_Upstream` (refused, or DNS failure)."""
        try:
            addresses = await self._resolve(host, port)
        except OSError as e:
            raise _Upstream(b"502 Guard DNS Failure", "dns_error", f"{host} does not resolve ({e.strerror or e})") from None
        why = self.policy.addresses_refusal(host, addresses)
        if why:
            raise _Upstream(REFUSED_STATUS, "refused_url", why)
        if not addresses:
            raise _Upstream(b"502 Guard DNS Failure", "dns_error", f"{host} resolves to no address")
        return addresses[0]

    async def _rate_limit(self, host: str) -> None:
        if not self.min_interval:
            return
        if self._slots is not None:  # a relay process: the slots are shared by all of them (CLOCK_MONOTONIC)
            i = zlib.crc32(host.encode("utf-8", "replace")) % len(self._slots)
            with self._slots.get_lock():
                now = time.monotonic()
                slot = max(now, self._slots[i])
                self._slots[i] = slot + self.min_interval
            if slot > now:
                await asyncio.sleep(slot - now)
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot[host])
            self._next_slot[host] = slot + self.min_interval
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _open(self, addr: str, host: str, port: int, tls: bool):
        """A connection to the checked address (TLS verified for ``host`` when ``tls``), or :class:`_Upstream`."""
        where = f"{host}:{port}" + (f" ({addr})" if addr != host else "")
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(addr, port, ssl=self._upstream_ssl if tls else None,
                                        server_hostname=host if tls else None, limit=RELAY_CHUNK),
                self.connect_timeout_s)
        except ssl.SSLCertVerificationError as e:
            raise _Upstream(b"502 Guard TLS Failure", "tls_error", f"{where}: certificate not trusted ({e.verify_message})") from None
        except ssl.SSLError as e:
            raise _Upstream(b"502 Guard TLS Failure", "tls_error", f"{where}: TLS handshake failed ({e.reason or e})") from None
        except asyncio.TimeoutError:
            raise _Upstream(b"504 Guard Upstream Timeout", "timeout",
                            f"{where}: no connection within {self.connect_timeout_s:g}s") from None
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)  # asyncio's own text ("Connect call failed") hides it
            raise _Upstream(b"502 Guard Connection Failed", "connection_error", f"{where}: {why}") from None

    async def _answer(self, writer: asyncio.StreamWriter, url: str, e: _Upstream) -> None:
        self._note(url, e.reason, e.detail)
        marker = e.status.split(b" ", 1)[1].decode()
        body = f"{marker}: {e.detail}\n".encode()
        writer.write(b"HTTP/1.1 " + e.status + b"\r\nContent-Type: text/plain\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()

    async def _connect(self, target: str, reader, writer) -> None:
        host, _, port_s = target.rpartition(":")
        host = host.strip("[]")
        port = int(port_s or 443)
        url = f"https://{target}" if port != 443 else f"https://{target.rsplit(':', 1)[0]}"
        try:
            if "https" not in self.policy.allowed_schemes:
                raise _Upstream(REFUSED_STATUS, "refused_url", "refused_scheme: https")
            addr = await self._checked_address(url, host, port)
            if not self.inspect_tls:
                await self._rate_limit(host)
            upstream = await self._open(addr, host, port, tls=self.inspect_tls)
        except _Upstream as e:
            return await self._answer(writer, url, e)
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        if not self.inspect_tls:
            return await _pipe_both(reader, writer, *upstream)
        await writer.start_tls(self._ca.server_context(host))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            upstream[1].close()
            return
        method, path, headers = _parse_head(head)
        with self._lock:
            self.stats.requests += 1
        await self._exchange(method, url + (path if path.startswith("/") else "/" + path), host, port, addr, True,
                             headers, reader, writer, upstream)

    async def _forward_http(self, method: str, target: str, headers: list[str], reader, writer) -> None:
        parts = urlsplit(target)
        try:
            if parts.scheme.lower() not in self.policy.allowed_schemes or parts.scheme.lower() != "http":
                raise _Upstream(REFUSED_STATUS, "refused_url", f"refused_scheme: {parts.scheme or '(none)'}")
            if not parts.hostname:
                raise _Upstream(REFUSED_STATUS, "refused_url", "malformed_url: no host")
            port = parts.port or 80
            addr = await self._checked_address(target, parts.hostname, port)
        except _Upstream as e:
            return await self._answer(writer, target, e)
        await self._exchange(method, target, parts.hostname, port, addr, False, headers, reader, writer, None)

    async def _exchange(self, method: str, url: str, host: str, port: int, addr: str, tls: bool, headers: list[str],
                        reader, writer, upstream) -> None:
        """One request to the checked address (HTTP, or HTTPS inside an intercepted tunnel): user agent, rate limit,
        429 back-off, opt-out check, response recorded, response relayed."""
        parts = urlsplit(url)
        body = b""
        length = _header(headers, "content-length")
        if length:
            body = await reader.readexactly(int(length))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        out_headers = [h for h in headers if h.split(":", 1)[0].strip().lower() not in _HOP_BY_HOP | {"accept-encoding"}]
        out_headers.append("Accept-Encoding: identity")  # what the client holds is what was counted (no inflating)
        if self.user_agent:
            out_headers = [h for h in out_headers if not h.lower().startswith("user-agent:")] + [f"User-Agent: {self.user_agent}"]
        if not _header(out_headers, "host"):
            out_headers.append(f"Host: {parts.netloc}")
        request = (f"{method} {path} HTTP/1.1\r\n" + "\r\n".join(out_headers) + "\r\nConnection: close\r\n\r\n").encode("latin-1") + body

        for attempt in range(self.retries_on_429 + 1):
            await self._rate_limit(host)
            # the deadline covers this attempt's connect, request, headers and body (not the polite waits)
            deadline = asyncio.get_running_loop().time() + self.deadline_s if self.deadline_s else None
            try:
                async with asyncio.timeout_at(deadline):
                    up_r, up_w, resp_head = await self._request_head(upstream, addr, host, port, tls, request)
            except _Upstream as e:
                return await self._answer(writer, url, e)
            except TimeoutError:
                return await self._answer(writer, url, _Upstream(
                    b"504 Guard Deadline Exceeded", "deadline_exceeded",
                    f"{host}:{port}: no answer within the deadline of {self.deadline_s:g}s"))
            upstream = None
            status_line, _, rest = resp_head.partition(b"\r\n")
            try:
                status = int(status_line.split(None, 2)[1])
            except (IndexError, ValueError):
                status = 0
            lines = rest.decode("latin-1").split("\r\n")
            if status == 429 and attempt < self.retries_on_429:
                up_w.close()
                with self._lock:
                    self.stats.retried_429 += 1
                await asyncio.sleep(retry_delay(_header(lines, "retry-after"), attempt, self.backoff_s))
                continue
            if self.directives and 200 <= status < 300:
                directive = robots_opt_out(_headers_all(lines, "x-robots-tag"), self.directives, self.agent_token)
                if directive:
                    up_w.close()
                    return await self._answer(writer, url, _Upstream(b"403 " + OPTED_OUT_MARKER.encode(), "opted_out",
                                                                     f"X-Robots-Tag: {directive}"))
            length = _header(lines, "content-length") or ""
            if self.max_body_bytes and 200 <= status < 300 and method.upper() != "HEAD" and length.isdigit() and int(length) > self.max_body_bytes:
                up_w.close()
                return await self._answer(writer, url, _Upstream(
                    b"502 Guard Body Too Large", "body_too_large",
                    f"{host}:{port}: Content-Length {int(length)} bytes, over the limit of {self.max_body_bytes} bytes"))
            self._record(url, status, _header(lines, "location") if 300 <= status < 400 else None)
            kept = [ln for ln in lines if ln and ln.split(":", 1)[0].strip().lower() not in ("connection", "keep-alive",
                                                                                          "content-encoding")]
            # a body that ends when the connection does is relayed chunked, so that a body cut off at a limit reads
            # as incomplete to the client (not as a shorter, complete one)
            reframe = bool(self.max_body_bytes or self.deadline_s) and not length and method.upper() != "HEAD" \
                and status >= 200 and status not in (204, 304) and not _header(lines, "transfer-encoding")
            if reframe:
                kept.append("Transfer-Encoding: chunked")
                if status_line.startswith(b"HTTP/1.0 "):  # chunked framing is HTTP/1.1's
                    status_line = b"HTTP/1.1 " + status_line[9:]
            writer.write(status_line + b"\r\n" + "\r\n".join(kept + ["Connection: close"]).encode("latin-1") + b"\r\n\r\n")
            cut = await _pipe(up_r, writer, self.max_body_bytes, deadline, chunked=reframe)
            up_w.close()
            if cut is not None:  # the client sees a cut-off body; the record names why
                why, sent = cut
                self._note(url, why, f"{host}:{port}: " + (
                    f"body over the limit of {self.max_body_bytes} bytes; cut off at {sent} bytes" if why == "body_too_large"
                    else f"response not complete within the deadline of {self.deadline_s:g}s; cut off at {sent} bytes"))
                writer.transport.abort()
            return

    async def _request_head(self, upstream, addr: str, host: str, port: int, tls: bool, request: bytes):
        """Connect (unless ``upstream`` is open already), send the request, read the response head:
        (reader, writer, head), or :class:`_Upstream`."""
        up_r, up_w = upstream if upstream is not None else await self._open(addr, host, port, tls)
        try:
            up_w.write(request)
            await up_w.drain()
            return up_r, up_w, await up_r.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError) as e:
            up_w.close()
            raise _Upstream(b"502 Guard Connection Failed", "connection_error",
                            f"{host}:{port}: no answer ({type(e).__name__}: {e})") from None
        except BaseException:  # the deadline (a cancellation) or a limit overrun
            up_w.close()
            raise


def _relay_process(sock: socket.socket, init: dict, slots, sink, control) -> None:
    """One relay process of a multi-process :class:`GuardProxy`: serves the shared listening socket until told to
    stop; its records go to ``sink``."""
    from mllm_pipeline.download.guard.tls_intercept import LocalCA, upstream_context

    proxy = GuardProxy(init["policy"], **init["kwargs"])
    proxy._slots, proxy._sink = slots, sink
    proxy._upstream_ssl = upstream_context(init["trust"])
    proxy._ca = LocalCA.from_state(init["ca"]) if init["ca"] is not None else None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(asyncio.start_server(proxy._handle, sock=sock, limit=1 << 16))

    def listen() -> None:
        while True:
            try:
                kind, n = control.recv()
            except (EOFError, OSError):
                kind, n = "stop", 0
            if kind == "sync":  # from the loop's thread: after every record it has made so far
                loop.call_soon_threadsafe(sink.put, ("pong", n))
            else:
                loop.call_soon_threadsafe(loop.stop)
                return

    threading.Thread(target=listen, name="guard-control", daemon=True).start()
    control.send(("ready", 0))
    started = time.thread_time()  # what relaying cost, without this process's start-up (imports)
    loop.run_forever()
    cpu = time.thread_time() - started
    server.close()
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    sink.put(("end", cpu, proxy.stats.requests, proxy.stats.retried_429))
    sink.close()
    sink.join_thread()
    if proxy._ca is not None:
        proxy._ca.close()


_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade"}


def _parse_head(head: bytes) -> tuple[str, str, list[str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    return method, target, [ln for ln in lines[1:] if ln]


def _header(headers: list[str], name: str) -> str | None:
    for h in headers:
        k, _, v = h.partition(":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def _headers_all(headers: list[str], name: str) -> list[str]:
    return [h.partition(":")[2].strip() for h in headers if h.partition(":")[0].strip().lower() == name]


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, max_bytes: int | None = None,
                deadline: float | None = None, chunked: bool = False) -> tuple[str, int] | None:
    """Relay until the end of ``src`` (``chunked``: in HTTP chunked framing); with limits, ``(reason, bytes
    relayed)`` where one cut it short (``body_too_large``: more than ``max_bytes``; ``deadline_exceeded``: not done
    by ``deadline``, loop time)."""
    sent = 0
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                chunk = await src.read(RELAY_CHUNK)
                if not chunk:
                    break
                if max_bytes and sent + len(chunk) > max_bytes:
                    return "body_too_large", sent
                sent += len(chunk)
                dst.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await dst.drain()
            if chunked:
                dst.write(b"0\r\n\r\n")
                await dst.drain()
    except TimeoutError:
        return "deadline_exceeded", sent
    except (ConnectionError, OSError):
        pass
    return None


async def _pipe_both(cr, cw, ur, uw) -> None:
    async def one(src, dst):
        await _pipe(src, dst)
        with contextlib.suppress(Exception):
            dst.close()

    await asyncio.gather(one(cr, uw), one(ur, cw))
