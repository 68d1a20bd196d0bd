"""Lineage and retention: which committed versions are still read, and an explicit rule for removing the rest.

Every committed version records the exact upstream versions it read (``inputs`` in its ``_version.json``, see
:mod:`mllm_pipeline.storage`). Commits never delete anything; this module is the only place that does, and only
when asked (the ``storage_retention`` asset). The rule:

* **kept**: the current version of every output; the last ``keep_last`` versions of every output; every version
  superseded less than ``min_age_hours`` ago; every version a running job has pinned (:func:`pinned`, e.g. the
  manifests a training run reads); and, transitively, every version that a kept version read (so the media tars
  that kept manifests point at, and the manifests a kept checkpoint was trained on, stay);
* **removed**: every other committed version, and version directories that were never committed (a killed run's
  leftovers) when no live run holds the output's write lock: they are removed under that lock, taken as writers
  take it, so a lock left by a dead process is taken over (:func:`mllm_pipeline.storage.holder_alive`).

Delta Lake or Lance would version the tabular outputs well, but the outputs that matter most here are webdataset
tars and checkpoints, and the lineage that protects them runs across stages (a manifest row names a tar in another
output). One small mechanism for every output, on local disks and S3 alike, is simpler than a table format for
some outputs plus this for the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

from mllm_pipeline.storage import (LOCK_FILE, MANIFEST, VERSION_FILE, ConcurrentWriteError, Storage, holder_alive,
                                   process_record, stale_lock)

log_default = logging.getLogger(__name__)

PINS = "_pins"


# -- pins: versions a running job reads ----------------------------------------------------------------------


@contextlib.contextmanager
def pinned(storage: Storage, refs: list[dict[str, str]], reason: str) -> Iterator[str]:
    """Keep ``refs`` (and what they read) from retention while the block runs; a killed job's pin is ignored once
    its process is gone (same machine) or after a week (another machine)."""
    pin_id = f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    rel = f"{PINS}/{pin_id}.json"
    storage.write_json(rel, {"refs": refs, "reason": reason, **process_record(), "since": _now().isoformat()})
    try:
        yield pin_id
    finally:
        storage.rm(rel)


def active_pins(storage: Storage, max_age_hours: float = 24 * 7) -> list[dict[str, Any]]:
    out = []
    for name in storage.listdir(PINS):
        if not name.endswith(".json"):
            continue
        try:
            pin = storage.read_json(f"{PINS}/{name}")
        except (FileNotFoundError, ValueError):
            continue
        if not holder_alive(pin):  # the same liveness rule as write locks
            continue
        if _age_hours(pin.get("since")) > max_age_hours:
            continue
        out.append(pin)
    return out


# -- what is on the root -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Output:
    prefix: str
    current: str | None
    versions: dict[str, dict[str, Any]]  # committed: id -> its manifest
    uncommitted: list[str]
    locked: bool  # its write lock is held by a live writer (a dead writer's lock does not count: it is taken over)
    stale_lock: bool = False  # its write lock was left by a dead process


def scan(storage: Storage) -> dict[str, Output]:
    """Every versioned output under the root: its current version, its committed and uncommitted versions."""
    root = storage._p("")
    pointers: set[str] = set()
    version_files: dict[str, set[str]] = {}
    dirs: dict[str, set[str]] = {}
    locks: set[str] = set()
    for path in storage.fs.find(root, withdirs=False):
        rel = posixpath.relpath(path, root)
        parent, name = posixpath.split(rel)
        if name == MANIFEST:
            pointers.add(parent)
        elif name == LOCK_FILE:
            locks.add(parent)
        grand, vdir = posixpath.split(parent)
        if vdir.startswith("v-") and not rel.startswith(PINS + "/"):
            dirs.setdefault(grand, set()).add(vdir)
            if name == VERSION_FILE:
                version_files.setdefault(grand, set()).add(vdir)
    out: dict[str, Output] = {}
    for prefix in sorted(pointers | set(version_files)):
        cur = storage.current(prefix)
        versions: dict[str, dict[str, Any]] = {}
        for vid in sorted(version_files.get(prefix, ())):
            m = storage.committed_version(prefix, vid)
            if m is not None:
                versions[vid] = m
        if cur is not None and cur["version"] not in versions:
            versions[cur["version"]] = cur  # written before versions carried their own manifest
        uncommitted = sorted(d for d in dirs.get(prefix, ()) if d not in versions)
        stale = False
        if prefix in locks:
            try:
                stale = stale_lock(storage.read_json(f"{prefix}/{LOCK_FILE}"))
            except (FileNotFoundError, ValueError):
                stale = False  # released meanwhile, or being written: treat as held this time
        out[prefix] = Output(prefix, cur["version"] if cur else None, versions, uncommitted,
                             prefix in locks and not stale, stale)
    return out


# -- the rule ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RetentionPlan:
    keep: list[dict[str, Any]]  # prefix, version, why
    remove: list[dict[str, Any]]  # prefix, version, why, superseded_hours
    pins: int


def plan_retention(storage: Storage, keep_last: int = 3, min_age_hours: float = 24 * 7) -> RetentionPlan:
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (the current version is always kept), not {keep_last}")
    if not min_age_hours >= 0:
        raise ValueError(f"min_age_hours must be 0 or more, not {min_age_hours}")
    outputs = scan(storage)
    why: dict[tuple[str, str], str] = {}
    superseded: dict[tuple[str, str], float] = {}
    for o in outputs.values():
        order = sorted(o.versions.values(), key=lambda m: m.get("committed_at", ""))
        for older, newer in zip(order, order[1:]):
            superseded[(o.prefix, older["version"])] = _age_hours(newer.get("committed_at"))
        if o.current:
            why[(o.prefix, o.current)] = "current"
        for m in order[-keep_last:]:
            why.setdefault((o.prefix, m["version"]), f"one of the last {keep_last}")
        for m in order:
            if superseded.get((o.prefix, m["version"]), 0.0) < min_age_hours:
                why.setdefault((o.prefix, m["version"]), f"superseded less than {min_age_hours:g} h ago")
    pins = active_pins(storage)
    for pin in pins:
        for ref in pin["refs"]:
            why.setdefault((ref["prefix"], ref["version"]), f"pinned by a running job ({pin.get('reason', '')})")
    # everything a kept version read is kept
    todo = list(why)
    while todo:
        prefix, vid = todo.pop()
        m = outputs[prefix].versions.get(vid) if prefix in outputs else None
        for ref in (m or {}).get("inputs") or []:
            k = (ref["prefix"], ref["version"])
            if k not in why:
                why[k] = f"read by {prefix}/{vid}"
                todo.append(k)
    keep, remove = [], []
    for o in outputs.values():
        for vid in o.versions:
            k = (o.prefix, vid)
            if k in why:
                keep.append({"prefix": o.prefix, "version": vid, "why": why[k]})
            else:
                remove.append({"prefix": o.prefix, "version": vid, "why": "superseded and read by no kept version",
                               "superseded_hours": round(superseded.get(k, 0.0), 1)})
        if not o.locked:
            why_dead = "never committed (a killed or failed run" + ("; its lock, left by a dead process, is taken "
                                                                    "over)" if o.stale_lock else ")")
            remove += [{"prefix": o.prefix, "version": d, "why": why_dead, "superseded_hours": None}
                       for d in o.uncommitted]
    return RetentionPlan(keep, remove, len(pins))


def apply_retention(storage: Storage, plan: RetentionPlan, log: Any = None) -> dict[str, Any]:
    """Remove what ``plan`` removes; returns counts and bytes freed."""
    log = log or log_default
    freed = 0
    removed = 0

    def remove(r: dict[str, Any]) -> None:
        nonlocal freed, removed
        rel = f"{r['prefix']}/{r['version']}"
        try:
            freed += int(storage.fs.du(storage._p(rel)))
        except (FileNotFoundError, OSError):
            pass
        storage.rm(rel, recursive=True)
        removed += 1
        log.info(f"removed {rel} ({r['why']})")

    uncommitted: dict[str, list[dict[str, Any]]] = {}
    for r in plan.remove:
        if r["why"].startswith("never committed"):
            uncommitted.setdefault(r["prefix"], []).append(r)
        else:
            remove(r)
    # a directory that was never committed is removed under the output's write lock, taken like a writer takes it
    # (a dead process's lock is taken over), so a writer that starts meanwhile is never removed from under it
    for prefix, rs in uncommitted.items():
        try:
            with storage.lock(prefix):
                for r in rs:
                    if storage.committed_version(r["prefix"], r["version"]) is None:
                        remove(r)
        except ConcurrentWriteError as e:
            log.info(f"kept the uncommitted version(s) of {prefix}: {e}")
    return {"removed": removed, "kept": len(plan.keep), "bytes_freed": freed}


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _age_hours(stamp: str | None) -> float:
    if not stamp:
        return float("inf")
    try:
        t = _dt.datetime.fromisoformat(stamp)
    except ValueError:
        return float("inf")
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return (_now() - t).total_seconds() / 3600
