"""A small forward HTTP proxy on loopback that enforces the URL policy for any downloader.

img2dataset (urllib), video2dataset (requests, yt-dlp) and ffmpeg all honour ``http_proxy`` / ``https_proxy``.
Pointing them at this proxy gives one place where, for every request *and every redirect* (each redirect is a
new request through the proxy):

* the target is resolved once and checked with :class:`~mllm_pipeline.download.url_policy.UrlPolicy`, and the
  connection goes to the very address that was checked (no DNS-rebinding gap); a refused target gets
  ``403 Refused By URL Policy`` and is recorded with its reason;
* requests to one host are spaced by a per-host rate limit;
* a ``429 Too Many Requests`` is retried after a back-off (``Retry-After`` when the server sends one);
* the ``User-Agent`` can be set for every request.

HTTPS goes through ``CONNECT``: the proxy checks the address and then only relays bytes (TLS stays end to
end). No library does this for Python downloaders (the known SSRF proxies are separate Go services), hence
this module; it is deliberately small: one request per client connection, HTTP/1.1, no caching.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
import threading
import time
from collections import Counter, defaultdict
from urllib.parse import urljoin, urlsplit

from mllm_pipeline.download.url_policy import UrlPolicy

REFUSED_STATUS = b"403 Refused By URL Policy"
REFUSED_MARKER = "Refused By URL Policy"  # what a client's error message contains for a refused URL


@dataclasses.dataclass
class ProxyStats:
    requests: int = 0
    refused: Counter = dataclasses.field(default_factory=Counter)
    retried_429: int = 0
    refused_urls: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class GuardProxy:
    """Run with ``with GuardProxy(policy) as proxy:``; ``proxy.url`` goes into ``http_proxy``/``https_proxy``."""

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
    ):
        self.policy = policy
        self.host = host  # the address it listens on and advertises: loopback, or one Spark executors can reach
        self.user_agent = user_agent
        self.min_interval = 1.0 / per_host_rate if per_host_rate else 0.0
        self.retries_on_429 = retries_on_429
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.stats = ProxyStats()
        self._responses: dict[str, tuple[int, str | None]] = {}
        self._refusals: dict[str, str] = {}
        self._lock = threading.Lock()
        self._next_slot: dict[str, float] = defaultdict(float)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> GuardProxy:
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, 0, limit=1 << 16))
                port = self._server.sockets[0].getsockname()[1]
                self.url = f"http://{self.host}:{port}"
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                errors.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
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
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def env(self) -> dict[str, str]:
        """Environment variables that route a child process's downloads through this proxy."""
        return {"http_proxy": self.url, "https_proxy": self.url, "HTTP_PROXY": self.url, "HTTPS_PROXY": self.url,
                "no_proxy": "", "NO_PROXY": ""}

    def outcome(self, url: str, max_hops: int = 10) -> tuple[int | None, str | None]:
        """(final HTTP status, refusal reason) of a URL fetched through this proxy, following recorded redirects.

        Lets a caller name the real reason when a downloader stored an error page as if it were media."""
        with self._lock:
            for _ in range(max_hops):
                if url in self._refusals:
                    return None, self._refusals[url]
                status, location = self._responses.get(url, (None, None))
                if status is None or not (300 <= status < 400 and location):
                    return status, None
                url = urljoin(url, location)
        return None, None

    # -- the proxy ------------------------------------------------------------------------------------
    def _record(self, url: str, status_line: bytes, head: bytes) -> None:
        try:
            status = int(status_line.split(None, 2)[1])
        except (IndexError, ValueError):
            return
        location = _header(head.decode("latin-1").split("\r\n"), "location") if 300 <= status < 400 else None
        with self._lock:
            if len(self._responses) < 1_000_000:
                self._responses[url] = (status, location)

    def _refuse(self, url: str, reason: str) -> None:
        with self._lock:
            if len(self._refusals) < 1_000_000:
                self._refusals[url] = reason
            self.stats.refused[reason.split(":", 1)[0]] += 1
            if len(self.stats.refused_urls) < 10_000:
                self.stats.refused_urls.append((url, reason))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers = [ln for ln in lines[1:] if ln]
            with self._lock:
                self.stats.requests += 1
            if method.upper() == "CONNECT":
                await self._connect(target, reader, writer)
            else:
                await self._forward(method, target, version, headers, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _checked_address(self, url: str, host: str, port: int) -> tuple[str | None, str]:
        """Resolve ``host``: (an allowed address, "") or (None, the reason, recorded as a refusal)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            why = f"unresolvable_host: {host} ({e})"
            self._refuse(url, why)
            return None, why
        addresses = sorted({i[4][0] for i in infos}, key=lambda a: ipaddress.ip_address(a.split("%")[0]).version)
        for addr in addresses:
            why = self.policy.address_refusal(addr)
            if why:
                why = f"refused_address: {host} resolves to {addr} ({why})"
                self._refuse(url, why)
                return None, why
        return (addresses[0], "") if addresses else (None, f"unresolvable_host: {host}")

    async def _rate_limit(self, host: str) -> None:
        if not self.min_interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot[host])
            self._next_slot[host] = slot + self.min_interval
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _send_refusal(self, writer: asyncio.StreamWriter, reason: str) -> None:
        body = f"{REFUSED_MARKER}: {reason}\n".encode()
        writer.write(b"HTTP/1.1 " + REFUSED_STATUS + b"\r\nContent-Type: text/plain\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()

    async def _connect(self, target: str, reader, writer) -> None:
        host, _, port_s = target.rpartition(":")
        host = host.strip("[]")
        url = f"https://{target}"
        if "https" not in self.policy.allowed_schemes:
            self._refuse(url, "refused_scheme: https")
            return await self._send_refusal(writer, "refused_scheme: https")
        addr, why = await self._checked_address(url, host, int(port_s or 443))
        if addr is None:
            return await self._send_refusal(writer, why)
        await self._rate_limit(host)
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(addr, int(port_s or 443)), self.connect_timeout_s)
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        await _pipe_both(reader, writer, up_r, up_w)

    async def _forward(self, method: str, target: str, version: str, headers: list[str], reader, writer) -> None:
        why = None
        parts = urlsplit(target)
        if parts.scheme.lower() not in self.policy.allowed_schemes or parts.scheme.lower() != "http":
            why = f"refused_scheme: {parts.scheme or '(none)'}"
        elif not parts.hostname:
            why = "malformed_url: no host"
        if why:
            self._refuse(target, why)
            return await self._send_refusal(writer, why)
        port = parts.port or 80
        addr, why = await self._checked_address(target, parts.hostname, port)
        if addr is None:
            return await self._send_refusal(writer, why)
        body = b""
        length = _header(headers, "content-length")
        if length:
            body = await reader.readexactly(int(length))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        out_headers = [h for h in headers if h.split(":", 1)[0].strip().lower() not in _HOP_BY_HOP]
        if self.user_agent:
            out_headers = [h for h in out_headers if not h.lower().startswith("user-agent:")] + [f"User-Agent: {self.user_agent}"]
        if not _header(out_headers, "host"):
            out_headers.append(f"Host: {parts.netloc}")
        request = (f"{method} {path} HTTP/1.1\r\n" + "\r\n".join(out_headers) + "\r\nConnection: close\r\n\r\n").encode("latin-1") + body

        for attempt in range(self.retries_on_429 + 1):
            await self._rate_limit(parts.hostname)
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(addr, port), self.connect_timeout_s)
            up_w.write(request)
            await up_w.drain()
            status_line = await up_r.readline()
            if b" 429 " in status_line[:16] and attempt < self.retries_on_429:
                resp_head = await up_r.readuntil(b"\r\n\r\n")
                up_w.close()
                retry_after = _header(resp_head.decode("latin-1").split("\r\n"), "retry-after")
                delay = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else self.backoff_s * 2**attempt
                with self._lock:
                    self.stats.retried_429 += 1
                await asyncio.sleep(min(delay, 60.0))
                continue
            head = await up_r.readuntil(b"\r\n\r\n")
            self._record(target, status_line, head)
            writer.write(status_line + head)
            await _pipe(up_r, writer)
            up_w.close()
            return


_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade"}


def _header(headers: list[str], name: str) -> str | None:
    for h in headers:
        k, _, v = h.partition(":")
        if k.strip().lower() == name:
            return v.strip()
    return None


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while True:
            chunk = await src.read(1 << 16)
            if not chunk:
                break
            dst.write(chunk)
            await dst.drain()
    except (ConnectionError, OSError):
        pass


async def _pipe_both(cr, cw, ur, uw) -> None:
    async def one(src, dst):
        await _pipe(src, dst)
        with contextlib.suppress(Exception):
            dst.close()

    await asyncio.gather(one(cr, uw), one(ur, cw))
