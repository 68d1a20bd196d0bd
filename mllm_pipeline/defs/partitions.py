"""Dynamic partitions: one per raw shard of a dataset, registered by the raw asset when it commits.

A media asset partitioned by ``<dataset>_shards`` can then be materialized or backfilled shard by shard (or a
range of shards) from the UI and the CLI. The keys are ``shard-00000``, ``shard-00001``, ... in shard order.
"""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.stages.media import shard_index, shard_key
from mllm_pipeline.stages.registry import DATASET_NAMES
from mllm_pipeline.storage import identity_digest

__all__ = ["SHARDS", "SHARDED_DATASETS", "combined_version", "register_shards", "shard_index", "shard_key"]

SHARDED_DATASETS = DATASET_NAMES

SHARDS: dict[str, dg.DynamicPartitionsDefinition] = {
    ds: dg.DynamicPartitionsDefinition(name=f"{ds}_shards") for ds in SHARDED_DATASETS
}


def register_shards(instance: dg.DagsterInstance, dataset: str, count: int) -> tuple[int, int]:
    """Make the partitions of ``dataset`` exactly shard-00000 .. shard-<count-1>; returns (added, removed)."""
    if dataset not in SHARDS:
        return 0, 0
    name = SHARDS[dataset].name
    want = [shard_key(i) for i in range(count)]
    have = set(instance.get_dynamic_partitions(name))
    new = [k for k in want if k not in have]
    if new:
        instance.add_dynamic_partitions(name, new)
    stale = sorted(have - set(want))
    for k in stale:
        instance.delete_dynamic_partition(name, k)
    return len(new), len(stale)


def combined_version(versions: list[str]) -> str:
    """The data version Dagster records for a run: the version itself for one partition; for a range (one run, one
    data version for all its partitions) a digest of the versions in partition order."""
    if len(versions) == 1:
        return versions[0]
    return f"range-{identity_digest(versions)}"
