"""The one gate every commit goes through: a new version is checked before it becomes current.

Every stage writes its output into a new version directory and then commits it (:meth:`Storage.new_version`,
:meth:`~mllm_pipeline.storage.Version.commit`). A storage opened for the pipeline (:func:`pipeline_storage`, what
the Dagster ``storage`` resource returns) carries this gate: at commit, with every file of the version in place and
the pointer not yet moved, :data:`GATE` runs the checks registered for the version's kind on it. If one fails,
:class:`CheckFailed` is raised, naming what is wrong; the pointer stays on the previous version (whatever read it
goes on reading it) and the new version directory is removed. If all pass, their verdicts are written into the
version's manifest (``checks``) and the version becomes current.

The checks are the read-back verifications of :mod:`mllm_pipeline.stages.verify`, the same ones the Dagster asset
checks run; an asset check that finds its verdict recorded at commit in the same run reports it instead of reading
everything again. To add a protection to a stage, register a check for its kind in :data:`CHECKS`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable
from typing import Any

from mllm_pipeline.stages.verify import (
    Verdict,
    verify_caption_shard,
    verify_eval_splits,
    verify_manifests,
    verify_media_shard,
    verify_quarantine_ceiling,
    verify_raw,
)
from mllm_pipeline.storage import Storage, Version

log_default = logging.getLogger(__name__)

#: check(storage, prefix, manifest of the version being committed) -> its verdict
Check = Callable[[Storage, str, dict[str, Any]], Verdict]


def _last(prefix: str, n: int) -> list[str]:
    return prefix.strip("/").split("/")[-n:]


#: version kind -> the named checks a version of that kind must pass before it becomes current
CHECKS: dict[str, dict[str, Check]] = {
    "raw_shards": {
        "rows_accounted": lambda st, prefix, m: verify_raw(st, _last(prefix, 1)[0], prefix, manifest=m),
        "within_quarantine_ceiling": lambda st, prefix, m: verify_quarantine_ceiling(st, prefix, manifest=m),
    },
    "media_shard": {
        "samples_accounted": lambda st, prefix, m: verify_media_shard(st, *_last(prefix, 2), manifest=m, as_written=True),
    },
    "clean_captions": {
        "captions_accounted": lambda st, prefix, m: verify_caption_shard(st, *_last(prefix, 2), manifest=m),
    },
    "manifests": {
        "nothing_silently_lost": lambda st, prefix, m: verify_manifests(st, prefix, manifest=m),
        "evaluation_splits_whole": lambda st, prefix, m: verify_eval_splits(st, prefix, manifest=m),
    },
}


class CheckFailed(RuntimeError):
    """A new version failed a check at commit: it did not become current and was removed."""

    def __init__(self, prefix: str, version: str, failed: dict[str, Verdict]):
        self.prefix, self.version, self.failed = prefix, version, failed
        lines = "; ".join(f"{name}: {v.message}" for name, v in failed.items())
        super().__init__(f"{prefix} {version} was not committed: it failed {', '.join(failed)} ({lines}). The "
                         f"previous version of {prefix} stays current.")


class Gate:
    """``gate(version, manifest)``: run the checks of ``manifest['kind']`` on the version; return the manifest with
    their verdicts, or raise :class:`CheckFailed`."""

    def __init__(self, checks: dict[str, dict[str, Check]] | None = None, log: Any = None):
        self.checks = CHECKS if checks is None else checks
        self.log = log or log_default

    def __call__(self, version: Version, manifest: dict[str, Any]) -> dict[str, Any]:
        checks = self.checks.get(manifest.get("kind", ""), {})
        if not checks:
            return manifest
        verdicts: dict[str, Verdict] = {}
        for name, check in checks.items():
            t0 = time.monotonic()
            verdicts[name] = check(version.storage, version.prefix, manifest)
            self.log.info(f"{version.prefix} {version.id}: {name} {'passed' if verdicts[name].passed else 'FAILED'} "
                          f"at commit ({time.monotonic() - t0:.1f}s)")
        failed = {n: v for n, v in verdicts.items() if not v.passed}
        if failed:
            raise CheckFailed(version.prefix, version.id, failed)
        at = _dt.datetime.now(_dt.timezone.utc).isoformat()
        return {**manifest, "checks": {n: {**v.to_dict(), "checked_at": at} for n, v in verdicts.items()}}


GATE = Gate()


def pipeline_storage(root: str | None = None) -> Storage:
    """The storage root with the commit gate: what every pipeline stage commits through."""
    return Storage(root, gate=GATE)


def verified_at_commit(manifest: dict[str, Any] | None, check: str, since: float | None) -> Verdict | None:
    """The verdict ``check`` recorded when ``manifest``'s version was committed, if that happened at or after
    ``since`` (a UNIX time: the start of the run asking), else None (the caller verifies again)."""
    if not manifest or since is None:
        return None
    rec = (manifest.get("checks") or {}).get(check)
    if not rec:
        return None
    try:
        at = _dt.datetime.fromisoformat(rec["checked_at"]).timestamp()
    except (KeyError, ValueError):
        return None
    if at < since:
        return None
    v = Verdict(f"{rec.get('subject', '')} (verified at commit)", counts=dict(rec.get("counts") or {}),
                problems=list(rec.get("problems") or []), problem_count=int(rec.get("problem_count") or 0))
    return v
