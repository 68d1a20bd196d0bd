"""The tests' loopback HTTP media server, with the failures real URL lists produce.

``serve_directory(root)`` serves the files under ``root`` (no path escapes it) and, under ``/_fault/``, the
failure cases a downloader has to survive:

=====================================  =====================================================================
``/_fault/status/<code>``              that HTTP status with a short body (404, 500, 403 ...)
``/_fault/html/<path>``                ``200`` with an HTML page instead of the media
``/_fault/truncated/<path>``           the file's full ``Content-Length`` but only half its bytes
``/_fault/slow/<seconds>/<path>``      the file, after waiting ``seconds``
``/_fault/redirect?to=<url>``          ``302`` to any URL (e.g. a link-local address)
``/_fault/429/<n>/<path>[?after=<s>]``  ``429`` with ``Retry-After: <s>`` (default 0) for the first ``n`` requests,
                                       then the file
``/_fault/robots/<directives>/<path>``  the file, with ``X-Robots-Tag: <directives>`` (a publisher's opt-out)
``/_fault/reset[/<anything>]``          no answer: the connection is reset (TCP RST) once the request is read
``/_fault/huge/<mib>[?length=0]``       ``200`` announcing ``<mib>`` MiB and sending zeros until the reader stops
                                       (``length=0``: no ``Content-Length``, the body ends when the connection does)
``/_fault/endless``                    ``200`` with a chunked body that never ends (until the reader stops)
``/_fault/drip/<seconds>/<path>``       the file with its full ``Content-Length``, one byte every ``seconds``
``/_fault/driphead/<seconds>``          the status line and headers, one byte every ``seconds``
=====================================  =====================================================================

Every streaming route stops after :data:`STREAM_CAP_S` seconds or :data:`STREAM_CAP_BYTES` bytes whatever the
client does, so a test that lets it run cannot hang or fill the machine.

``serve_directory(root, ssl_context=ctx)`` serves the same over HTTPS.

``MediaServer`` records what it saw (``user_agents``, ``paths``, ``times``) so a test can assert on the requests.

This lives with the tests, not in the installed package: the demo only needs its static files served, which
``mllm_pipeline.demo.media_host`` does with the standard library's server. Run it by hand (from the repository
root) with ``python -m mllm_pipeline_tests.media_server --root data/demo --port 8765``.
"""

from __future__ import annotations

import argparse
import contextlib
import mimetypes
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

#: what one streaming fault route sends at most (time, bytes)
STREAM_CAP_S = 60.0
STREAM_CAP_BYTES = 4 << 30


class _Handler(BaseHTTPRequestHandler):
    server_version = "mllm-demo/1"
    protocol_version = "HTTP/1.1"
    root: Path
    counts: Counter
    lock: threading.Lock
    seen_user_agents: list

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _file(self, rel: str) -> Path | None:
        path = (self.root / unquote(rel).lstrip("/")).resolve()
        if self.root not in path.parents or not path.is_file():
            return None
        return path

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", extra: dict | None = None, head: bool = False,
              length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Connection", "close")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            with contextlib.suppress(ConnectionError):
                self.wfile.write(body)
        self.close_connection = True

    def _serve_file(self, rel: str, head: bool, truncate: bool = False, extra: dict | None = None) -> None:
        path = self._file(rel)
        if path is None:
            return self._send(404, b"not found\n", head=head)
        data = path.read_bytes()
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if truncate:
            return self._send(200, data[: len(data) // 2], ctype, head=head, length=len(data))
        self._send(200, data, ctype, head=head, extra=extra)

    def _route(self, head: bool) -> None:
        with self.lock:
            self.seen_user_agents.append(self.headers.get("User-Agent", ""))
            self.seen_paths.append(self.path)
            self.seen_times.append(time.monotonic())
        url = urlsplit(self.path)
        parts = url.path.split("/")
        if len(parts) > 2 and parts[1] == "_fault":
            kind, rest = parts[2], parts[3:]
            if kind == "status" and rest:
                code = int(rest[0])
                return self._send(code, f"status {code}\n".encode(), head=head)
            if kind == "html":
                return self._send(200, b"<html><body><h1>Not the image you asked for</h1></body></html>", "text/html", head=head)
            if kind == "truncated":
                return self._serve_file("/".join(rest), head, truncate=True)
            if kind == "slow" and rest:
                time.sleep(float(rest[0]))
                return self._serve_file("/".join(rest[1:]), head)
            if kind == "redirect":
                target = parse_qs(url.query).get("to", [""])[0]
                return self._send(302, b"", extra={"Location": target}, head=head)
            if kind == "429" and rest:
                key = "/".join(rest[1:])
                with self.lock:
                    self.counts[key] += 1
                    n = self.counts[key]
                if n <= int(rest[0]):
                    after = parse_qs(url.query).get("after", ["0"])[0]
                    return self._send(429, b"slow down\n", extra={"Retry-After": after}, head=head)
                return self._serve_file(key, head)
            if kind == "reset":  # SO_LINGER 0: close() sends RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return None
            if kind == "robots" and rest:
                return self._serve_file("/".join(rest[1:]), head, extra={"X-Robots-Tag": unquote(rest[0])})
            if kind in ("huge", "endless", "drip", "driphead"):
                return self._stream(kind, rest, parse_qs(url.query), head)
            return self._send(404, b"unknown fault\n", head=head)
        self._serve_file(url.path, head)


    def _stream(self, kind: str, rest: list[str], query: dict, head: bool) -> None:
        """The hostile bodies (see the module): each bounded by STREAM_CAP_S / STREAM_CAP_BYTES."""
        self.close_connection = True
        start, sent = time.monotonic(), 0
        if kind == "driphead":
            line = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 0\r\n\r\n"
            with contextlib.suppress(OSError):
                for b in line:
                    if time.monotonic() - start > STREAM_CAP_S:
                        return
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(float(rest[0]))
            return
        if kind == "drip":
            path = self._file("/".join(rest[1:]))
            data = path.read_bytes() if path is not None else b"x" * 1000
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):
                for b in data:
                    if time.monotonic() - start > STREAM_CAP_S:
                        return
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(float(rest[0]))
            return
        chunked = kind == "endless"
        total = STREAM_CAP_BYTES if chunked else min(int(float(rest[0]) * (1 << 20)) if rest else 0, STREAM_CAP_BYTES)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif query.get("length", ["1"])[0] != "0":
            self.send_header("Content-Length", str(total))
        self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        block = bytes(1 << 16)
        with contextlib.suppress(OSError):
            while sent < total and time.monotonic() - start < STREAM_CAP_S:
                n = min(len(block), total - sent)
                self.wfile.write(b"%x\r\n%s\r\n" % (n, block[:n]) if chunked else block[:n])
                sent += n


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's default backlog of 5 drops connections from 64 concurrent clients


class MediaServer:
    """A running server: ``base_url``, the user agents it saw, and ``stop()``."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, ssl_context=None):
        handler = type("Handler", (_Handler,), {"root": Path(root).resolve(), "counts": Counter(),
                                                 "lock": threading.Lock(), "seen_user_agents": [],
                                                 "seen_paths": [], "seen_times": []})
        self.handler = handler
        self.httpd = _Server((host, port), handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            # the handshake happens in the request's thread, not in the accepting one
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.base_url = f"{'https' if ssl_context is not None else 'http'}://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="media-server", daemon=True)
        self.thread.start()

    @property
    def user_agents(self) -> list[str]:
        return list(self.handler.seen_user_agents)

    @property
    def paths(self) -> list[str]:
        """Every request path (with query) the server saw, in order."""
        return list(self.handler.seen_paths)

    @property
    def times(self) -> list[float]:
        """When each request of :attr:`paths` arrived (``time.monotonic()``), in the same order."""
        return list(self.handler.seen_times)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def serve_directory(root: str | Path, host: str = "127.0.0.1", port: int = 0, ssl_context=None) -> Iterator[MediaServer]:
    server = MediaServer(root, host, port, ssl_context)
    try:
        yield server
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve a directory (and the fault routes) on loopback.")
    ap.add_argument("--root", default="data/demo")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    with serve_directory(args.root, port=args.port) as server:
        print(f"serving {args.root} at {server.base_url} (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            server.thread.join()


if __name__ == "__main__":
    main()
