"""img2dataset's worker processes with the inline URL guard installed (see :mod:`.inline`).

img2dataset builds one ``Downloader`` and hands it, pickled, to each worker process it spawns, which calls it once
per shard. :func:`guarded` makes ``img2dataset.download`` build a :class:`GuardedDownloader` instead (for calls made
in the current thread only, so concurrent calls with and without the guard do not mix): the same downloader, which
first installs the guard's opener in the worker and afterwards writes the worker's guard statistics. This module
imports img2dataset; import it only where img2dataset runs.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator

from img2dataset.downloader import Downloader

from mllm_pipeline.download.guard.inline import GuardSettings, install, write_stats

_local = threading.local()
_patch_lock = threading.Lock()


class GuardedDownloader(Downloader):
    def __init__(self, guard_settings: GuardSettings, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard_settings = guard_settings

    def __call__(self, row):
        install(self.guard_settings)
        try:
            return super().__call__(row)
        finally:
            write_stats()


def _build(*args, **kwargs) -> Downloader:
    settings = getattr(_local, "settings", None)
    return Downloader(*args, **kwargs) if settings is None else GuardedDownloader(settings, *args, **kwargs)


@contextlib.contextmanager
def guarded(settings: GuardSettings) -> Iterator[None]:
    """``img2dataset.download`` calls made by this thread inside the block guard every request with ``settings``."""
    main = importlib.import_module("img2dataset.main")  # the module (the package's ``main`` is a function)
    with _patch_lock:
        if main.Downloader is not _build:
            main.Downloader = _build
    _local.settings = settings
    try:
        yield
    finally:
        _local.settings = None
