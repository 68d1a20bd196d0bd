"""A static HTTP server for the demo corpus's media, on loopback.

The demo corpus (:mod:`mllm_pipeline.demo.generate`) is a directory of plain files whose URLs are
``<base_url>/<path relative to the directory>``; its one deliberately missing image only needs an ordinary 404.
The standard library's ``http.server.ThreadingHTTPServer`` with ``SimpleHTTPRequestHandler`` (bound to the
directory with ``directory=``) is all that takes: it serves the files under that directory and nothing outside it,
answers 404 for a missing file, supports ``HEAD``, handles each request in its own thread (the download stage
fetches in parallel) and needs no dependency. The failures a downloader has to survive (error statuses, truncated
bodies, 429s, redirects, ``X-Robots-Tag`` opt-outs) are the tests' business: they have their own fault-injecting
server (``mllm_pipeline_tests/media_server.py``), which is not part of the installed package.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no access log on stderr
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's default backlog of 5 drops connections from many parallel downloads


@contextlib.contextmanager
def serve_static(directory: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the files under ``directory`` at ``http://host:port`` from a background thread for the duration;
    yield the base URL (``port=0``: any free port). Binding a port that is in use raises ``OSError`` (``EADDRINUSE``)."""
    handler = functools.partial(_QuietHandler, directory=str(Path(directory).resolve()))
    httpd = _Server((host, port), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="demo-media-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
