"""Shard roll-ups: one version for all the shards of a sharded stage, read from what storage has committed.

A sharded stage (``images_<dataset>``, ``captions_<dataset>``, ``webvid_watermark``) commits one output per raw
shard, each with its own version. The stages that read every shard (media hashes, caption de-duplication, the
manifests) need to know when *any* shard changed, at any shard count, and which one. :func:`shard_versions`
reads the committed version of every raw shard's output (``None`` where none is committed yet);
:func:`rollup_version` is a digest of the committed ones, so it changes exactly when a shard's committed output
does (a re-fetch or retry that commits a new version; a shard fetched for the first time; a shard gone);
:func:`changed_shards` names the shards that differ between two mappings.

Storage, not the orchestrator, is the source of each shard's version: a run over a range of shards commits one
version per shard even where the orchestrator records one version for the whole range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.stages.media import shard_key
from mllm_pipeline.storage import Storage, identity_digest

#: remote stores answer one small read in tens of milliseconds; reading 1,000 manifests one by one would take
#: tens of seconds, so they are read this many at a time (local disks gain nothing and lose nothing)
READERS = 16


def shard_versions(storage: Storage, dataset: str, prefix_of: Callable[[str], str]) -> dict[str, Optional[str]]:
    """``{shard key: committed version or None}`` for every raw shard of ``dataset`` (``{}`` before the raw stage
    has committed); ``prefix_of(shard key)`` is where the stage commits that shard."""
    try:
        count = len(raw_shards(storage, dataset))
    except FileNotFoundError:
        return {}
    keys = [shard_key(i) for i in range(count)]

    def version(key: str) -> Optional[str]:
        m = storage.current(prefix_of(key))
        return None if m is None else m["version"]

    with ThreadPoolExecutor(max_workers=READERS if not storage.local else 1) as pool:
        return dict(zip(keys, pool.map(version, keys)))


def rollup_version(versions: Mapping[str, Optional[str]]) -> str:
    """The roll-up's version: a digest of every committed shard's version. A shard with nothing committed yet does
    not count (what reads the shards reads only committed ones), so a raw shard added but not yet processed changes
    nothing downstream, and a shard processed for the first time does."""
    committed = sorted((k, v) for k, v in versions.items() if v is not None)
    return f"shards-{identity_digest(committed)}" if committed else "no-shards"


def changed_shards(before: Mapping[str, Optional[str]], after: Mapping[str, Optional[str]]) -> list[str]:
    """The shards whose committed version differs between ``before`` and ``after`` (committed for the first time,
    changed, or gone), the same changes that change :func:`rollup_version`."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def summary(versions: Mapping[str, Optional[str]]) -> dict[str, int]:
    """How many shards are committed and how many are not yet."""
    committed = sum(v is not None for v in versions.values())
    return {"shards": len(versions), "committed": committed, "not_committed": len(versions) - committed}
