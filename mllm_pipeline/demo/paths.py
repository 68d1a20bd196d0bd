"""Where the embedded demo corpus lives and which URL its media are served from."""

from __future__ import annotations

import os
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
