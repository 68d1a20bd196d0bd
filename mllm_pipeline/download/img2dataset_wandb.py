"""img2dataset's own Weights & Biases reporting, with the settings of :mod:`mllm_pipeline.tracking` and no secrets.

img2dataset 1.47 reports to W&B from a logger process it spawns (``img2dataset.logger.LoggerProcess``): speed and
success ratios per worker shard and in total (``worker/*``, ``total/*``: ``img_per_sec``, ``success``,
``failed_to_download``, ``failed_to_resize``, ``count``) and a ``status`` table of the most frequent error messages.
It calls ``wandb.init(project=...)`` with nothing else, so the rest (mode, directory, entity, run name, group) has to
come from ``WANDB_*`` variables in that process. :func:`reporting` makes ``img2dataset.download`` calls made by the
current thread build a :class:`TrackedLoggerProcess` instead: the same process, which sets those variables in itself
(not in this process, where concurrent shards run other downloads) and passes the error messages of the status table
and every string of the logged config through :func:`mllm_pipeline.redact.redact_text` first. This module imports
img2dataset; import it only where img2dataset runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections import Counter
from collections.abc import Iterator

from img2dataset.logger import LoggerProcess, StatusTableLogger

from mllm_pipeline.redact import redact_text
from mllm_pipeline.tracking import TrackingSettings, scrub

_local = threading.local()
_patch_lock = threading.Lock()


class RedactedStatusTableLogger(StatusTableLogger):
    """img2dataset's status table with the secrets in its error messages masked."""

    def do_log(self, status_dict, count):  # noqa: D102 -- img2dataset's signature
        clean: Counter = Counter()
        for message, n in status_dict.most_common(self.max_status):
            clean[redact_text(message)] += n
        super().do_log(clean, count)


class TrackedLoggerProcess(LoggerProcess):
    """img2dataset's logger process, reporting to W&B with ``env`` (``TrackingSettings.wandb_env``) set in itself."""

    def __init__(self, env: dict[str, str], output_folder, enable_wandb, wandb_project, config_parameters):
        super().__init__(output_folder, enable_wandb, wandb_project, scrub(config_parameters))
        self.wandb_env = env

    def run(self):  # runs in the spawned process
        os.environ.update(self.wandb_env)
        logger = importlib.import_module("img2dataset.logger")
        logger.StatusTableLogger = RedactedStatusTableLogger
        super().run()


def _build(output_folder, enable_wandb, wandb_project, config_parameters, *args, **kwargs) -> LoggerProcess:
    env = getattr(_local, "env", None)
    if env is None or not enable_wandb:
        return LoggerProcess(output_folder, enable_wandb, wandb_project, config_parameters, *args, **kwargs)
    return TrackedLoggerProcess(env, output_folder, enable_wandb, wandb_project, config_parameters)


@contextlib.contextmanager
def reporting(settings: TrackingSettings, name: str) -> Iterator[dict[str, object]]:
    """Within the block, ``img2dataset.download`` calls of this thread report to W&B as ``settings`` say, as a run
    named ``name`` in the settings' group (job type ``img2dataset``). Yields img2dataset's own arguments for it
    (``enable_wandb``, ``wandb_project``)."""
    main = importlib.import_module("img2dataset.main")  # the module (the package's ``main`` is a function)
    with _patch_lock:
        if main.LoggerProcess is not _build:
            main.LoggerProcess = _build
    _local.env = settings.wandb_env(name, "img2dataset")
    try:
        yield {"enable_wandb": True, "wandb_project": settings.project}
    finally:
        _local.env = None
