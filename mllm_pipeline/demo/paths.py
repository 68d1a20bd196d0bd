"""Where the embedded demo corpus lives and which URL its media are served from."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from mllm_pipeline.storage import Storage


def demo_dir(storage: Storage) -> Path:
    """``$MLLM_DEMO_DIR``, else ``<root>/demo`` for a local root, else a local cache directory (S3 root)."""
    if os.environ.get("MLLM_DEMO_DIR"):
        return Path(os.environ["MLLM_DEMO_DIR"])
    if storage.local:
        return Path(storage.root) / "demo"
    return Path(os.path.expanduser("~/.cache/mllm_pipeline/demo"))


def demo_media_base_url() -> str:
    from mllm_pipeline.demo.generate import DEFAULT_MEDIA_BASE_URL

    return os.environ.get("MLLM_DEMO_MEDIA_URL", DEFAULT_MEDIA_BASE_URL).rstrip("/")


def ensure_demo_corpus(storage: Storage) -> dict[str, Path]:
    """Generate the demo corpus if it is not there yet; return its annotation paths by name."""
    from mllm_pipeline.demo.generate import generate_demo_corpus

    return generate_demo_corpus(demo_dir(storage), base_url=demo_media_base_url())


class PrintLog:
    """A logger for the demo's own commands: ``info`` prints."""

    def info(self, msg: str) -> None:
        print(msg, flush=True)


@contextlib.contextmanager
def demo_media_served(storage: Storage, log=None) -> Iterator[None]:
    """Serve the demo corpus's media at its base URL for the duration (unless something already serves it)."""
    from urllib.parse import urlsplit

    from mllm_pipeline.demo.media_host import serve_static

    base = urlsplit(demo_media_base_url())
    host, port = base.hostname or "127.0.0.1", base.port or 80
    try:
        with serve_static(demo_dir(storage), host=host, port=port) as base_url:
            if log is not None:
                log.info(f"serving the demo media at {base_url} for this run")
            yield
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        if log is not None:
            log.info(f"{host}:{port} is already in use: assuming another run is serving the demo media there")
        yield
