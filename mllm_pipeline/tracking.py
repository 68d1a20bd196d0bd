"""Experiment tracking: metrics to Weights & Biases and TensorBoard, for downloads and training. Off by default.

:class:`TrackingSettings` say where metrics go (W&B project, entity, online or offline, run name and group; the
TensorBoard log directory). They travel as JSON (``--tracking`` of ``python -m mllm_pipeline.train``) so that a
training subprocess gets the same settings as the asset that launched it. :class:`Tracker` is one tracked run: it
logs numeric metrics per step to both backends, a summary, tables, and says where the run can be found
(:meth:`Tracker.links`). Everything logged passes through :func:`mllm_pipeline.redact.redact_text` first, so a URL
with credentials in a config or a failure detail never reaches a dashboard.

W&B modes: ``online`` needs ``WANDB_API_KEY`` (or ``wandb login``) where the run executes; ``offline`` writes the run
under ``<wandb_dir>/wandb/offline-run-*`` and ``wandb sync <that dir>`` uploads it later. TensorBoard: each run
writes event files into its own directory under ``tensorboard_dir``; ``tensorboard --logdir <tensorboard_dir>``
shows them all.

This module imports neither Dagster nor (until a run starts) wandb or torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mllm_pipeline.redact import redact_text

MODES = ("online", "offline")
#: the file a tracked training run writes into its output directory: where its W&B run and TensorBoard events are
LINKS_FILE = "tracking.json"


@dataclasses.dataclass
class TrackingSettings:
    """Where a run's metrics go. Both backends are off by default."""

    wandb: bool = False  # log to Weights & Biases
    mode: str = "online"  # W&B: online (needs WANDB_API_KEY) or offline (local files; `wandb sync` uploads them)
    project: str = "mllm_pipeline"
    entity: str = ""  # W&B team or user ("" = the API key's default entity)
    run_name: str = ""  # "" = the caller's default (the assets: asset key and partition)
    group: str = ""  # W&B run group (the downloaders' own runs join the asset run's group)
    wandb_dir: str = ""  # where W&B writes its files ("" = the working directory); offline runs stay there
    tensorboard: bool = False  # write TensorBoard event files
    tensorboard_dir: str = "tensorboard"  # the log root; each run writes into <tensorboard_dir>/<run name>/<run id>
    run_id: str = ""  # fixed W&B run id / TensorBoard sub-directory ("" = generated)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"tracking mode must be one of {MODES}, got {self.mode!r}")
        if self.wandb and not self.project:
            raise ValueError("tracking: W&B needs a project")

    @property
    def enabled(self) -> bool:
        return self.wandb or self.tensorboard

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any] | None) -> TrackingSettings:
        d = json.loads(text) if isinstance(text, str) else dict(text or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tracking option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def for_run(self, default_name: str, run_id: str = "") -> TrackingSettings:
        """These settings for one run: the run name (``run_name`` or ``default_name``), a run id, and absolute
        directories (a subprocess with another working directory writes to the same places)."""
        return dataclasses.replace(
            self, run_name=self.run_name or default_name, group=self.group or self.run_name or default_name,
            run_id=self.run_id or run_id or _new_id(),
            wandb_dir=str(Path(self.wandb_dir or ".").resolve()),
            tensorboard_dir=str(Path(self.tensorboard_dir or "tensorboard").resolve()))

    def tensorboard_run_dir(self) -> str:
        return str(Path(self.tensorboard_dir) / _slug(self.run_name or "run") / (self.run_id or "run"))

    def wandb_env(self, name: str, job_type: str) -> dict[str, str]:
        """Environment variables that make a W&B run started by another program (img2dataset's logger process)
        use these settings: project, entity, mode, directory, name, group and job type, and never prompt."""
        env = {"WANDB_PROJECT": self.project, "WANDB_MODE": self.mode, "WANDB_DIR": self.wandb_dir or ".",
               "WANDB_NAME": name, "WANDB_RUN_GROUP": self.group or self.run_name, "WANDB_JOB_TYPE": job_type,
               "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
        if self.entity:
            env["WANDB_ENTITY"] = self.entity
        return env


def _new_id() -> str:
    import secrets

    return secrets.token_hex(4)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "run"


def scrub(value: Any) -> Any:
    """``value`` (a config, a table cell) with secrets in URLs masked, recursively."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {str(k): scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v) if isinstance(v, float) else int(v)
    return out


class Tracker:
    """One tracked run, on W&B and / or TensorBoard as ``settings`` say (nothing at all when both are off).

    Use as a context manager, or call :meth:`finish`. ``job_type`` tells runs apart in a W&B group (``train``,
    ``download``); ``config`` is the run's configuration (scrubbed of URL secrets before it is sent)."""

    def __init__(self, settings: TrackingSettings, job_type: str, config: Mapping[str, Any] | None = None):
        self.settings = settings
        self.run: Any = None
        self.writer: Any = None
        if settings.wandb:
            import wandb

            self.run = wandb.init(
                project=settings.project, entity=settings.entity or None, name=settings.run_name or None,
                group=settings.group or None, job_type=job_type, id=settings.run_id or None,
                dir=settings.wandb_dir or None, mode=settings.mode, config=scrub(dict(config or {})),
                settings=wandb.Settings(console="off", silent=True))
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=settings.tensorboard_run_dir())
            if config:
                self.writer.add_text("config", "```\n" + json.dumps(scrub(dict(config)), indent=2, default=str) + "\n```")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish(exit_code=1 if exc[0] is not None else 0)

    def update_config(self, config: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(scrub(dict(config)), allow_val_change=True)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """The numeric values of ``metrics`` at ``step`` (others are left out; so are NaN and infinities)."""
        values = _numeric(metrics)
        if not values:
            return
        if self.run is not None:
            self.run.log(values, step=step)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, global_step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final figures of the run (W&B's run summary; TensorBoard gets them as text)."""
        clean = scrub({k: v for k, v in values.items() if v is not None})
        if self.run is not None:
            self.run.summary.update(clean)
        if self.writer is not None:
            self.writer.add_text("summary", "```\n" + json.dumps(clean, indent=2, default=str) + "\n```")

    def table(self, name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """A table (W&B Table; a markdown table as TensorBoard text)."""
        data = [[scrub(c) for c in r] for r in rows]
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=list(columns), data=data)})
        if self.writer is not None:
            head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            self.writer.add_text(name, head + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in data))

    def links(self) -> dict[str, str]:
        """Where the run is: ``wandb_url`` (online), ``wandb_run_dir`` (the run's local files; what ``wandb sync``
        takes when offline) and ``tensorboard_log_dir``."""
        out: dict[str, str] = {}
        if self.run is not None:
            if self.run.url:
                out["wandb_url"] = self.run.url
            sync_dir = getattr(self.run.settings, "sync_dir", None)
            if sync_dir:
                out["wandb_run_dir"] = str(sync_dir)
        if self.writer is not None:
            out["tensorboard_log_dir"] = self.settings.tensorboard_run_dir()
        return out

    def finish(self, exit_code: int = 0) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def training_metrics(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A ``metrics.jsonl`` record under the names a dashboard groups by: ``val_loss`` becomes ``val/loss``, the rest
    ``train/<name>`` (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``train/mfu``,
    ``train/max_memory_gib`` ...); ``step`` is the x axis, not a metric."""
    return {("val/loss" if k == "val_loss" else f"train/{k}"): v for k, v in rec.items() if k != "step"}


def shard_metrics(summary: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """A media shard's statistics (``ShardOutcome.summary``) as metrics: ``shard/attempted``, ``shard/succeeded``,
    ``shard/failed``, ``shard/success_rate``, ``shard/seconds`` and ``shard/failed/<reason>`` per reason."""
    out = {f"shard/{k}": summary[k] for k in ("attempted", "succeeded", "failed", "success_rate") if k in summary}
    out["shard/seconds"] = seconds
    for reason, n in (summary.get("failed_by_reason") or {}).items():
        out[f"shard/failed/{reason}"] = n
    return out


def write_links(output: str | os.PathLike, links: Mapping[str, str]) -> None:
    (Path(output) / LINKS_FILE).write_text(json.dumps(dict(links), indent=2))


def read_links(output: str | os.PathLike) -> dict[str, str]:
    path = Path(output) / LINKS_FILE
    return json.loads(path.read_text()) if path.exists() else {}
