"""Dynamic partitions: one per raw shard of a dataset, registered by the raw asset when it commits; and the shard
roll-ups that carry a sharded stage's changes to the stages that read every shard.

A media asset partitioned by ``<dataset>_shards`` can then be materialized or backfilled shard by shard (or a
range of shards) from the UI and the CLI. The keys are ``shard-00000``, ``shard-00001``, ... in shard order.

**Roll-ups.** Dagster 1.13 does not check staleness across an edge where a partition has 100 or more upstream
partitions (``SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD``): an unpartitioned stage that read 332 shards is
never marked stale by a changed shard. So every sharded stage ``<stage>`` has an unpartitioned observable roll-up,
``<stage>_shards``, whose data version is a digest of every shard's committed version in storage
(:mod:`mllm_pipeline.stages.rollup`), and the stages that read every shard depend on the roll-ups, not on the
partitioned stages. One-to-one edges have no threshold, so Dagster marks them stale ("<stage>_shards has a new
data version") and ``AutomationCondition.eager()`` requests them, at any shard count. Each run of a sharded stage
observes its roll-up when it ends (metadata ``changed_shards`` names the shards that changed since the previous
observation); **Observe** on the roll-up re-reads storage after a change made outside Dagster.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Optional

import dagster as dg

from mllm_pipeline.defs.tables import table
from mllm_pipeline.stages import rollup
from mllm_pipeline.stages.media import shard_index, shard_key
from mllm_pipeline.stages.registry import DATASET_NAMES, DATASETS
from mllm_pipeline.stages.watermark import NAME as WATERMARK
from mllm_pipeline.storage import Storage, identity_digest

__all__ = ["SHARDS", "SHARDED_DATASETS", "combined_version", "register_shards", "shard_index", "shard_key",
           "rollup_key", "shard_rollup", "observe_shards", "ROLLUP_KEYS"]

SHARDED_DATASETS = DATASET_NAMES

SHARDS: dict[str, dg.DynamicPartitionsDefinition] = {
    ds: dg.DynamicPartitionsDefinition(name=f"{ds}_shards") for ds in SHARDED_DATASETS
}

#: the data version tag Dagster reads from an observation (an observation logged from a run carries it as a tag)
DATA_VERSION_TAG = "dagster/data_version"
#: how many changed shards a roll-up names in its ``changed_shards`` metadata (the count is always complete)
NAMED_CHANGES = 50


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
    data version for all its partitions) a digest of the versions in partition order. Nothing downstream compares
    it: the roll-ups read each shard's own committed version from storage, and each partition's materialization
    carries its shard's ``version`` in its metadata."""
    if len(versions) == 1:
        return versions[0]
    return f"range-{identity_digest(versions)}"


# -- roll-ups ---------------------------------------------------------------------------------------------------


def rollup_key(stage: str) -> dg.AssetKey:
    """The roll-up of the sharded stage ``stage`` (``images_cc3m`` -> ``images_cc3m_shards``)."""
    return dg.AssetKey(f"{stage}_shards")


#: every roll-up: the media and caption stages of every dataset, and the WebVid watermark stage
ROLLUP_KEYS: tuple[dg.AssetKey, ...] = tuple(
    rollup_key(stage) for d in DATASETS.values() for stage in (d.media_asset, d.captions_asset)) + (rollup_key(WATERMARK),)


def _previous(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, Optional[str]]:
    records = instance.fetch_observations(key, limit=1).records
    if not records or records[0].asset_observation is None:
        return {}
    value = records[0].asset_observation.metadata.get("shard_versions")
    if not isinstance(value, dg.TableMetadataValue):
        return {}
    return {r.data["shard"]: r.data["version"] or None for r in value.records}


def _observation(instance: dg.DagsterInstance, stage: str, dataset: str, storage: Storage,
                 prefix_of: Callable[[str], str]) -> tuple[str, dict[str, Any]]:
    key = rollup_key(stage)
    versions = rollup.shard_versions(storage, dataset, prefix_of)
    changed = rollup.changed_shards(_previous(instance, key), versions)
    more = len(changed) - NAMED_CHANGES
    named = ", ".join(changed[:NAMED_CHANGES]) + (f" and {more} more" if more > 0 else "")
    metadata: dict[str, Any] = {
        **rollup.summary(versions),
        "changed": len(changed),
        "changed_shards": named or "none",
        "shard_versions": table([{"shard": k, "version": v or ""} for k, v in versions.items()], ["shard", "version"],
                                {"version": "the shard's committed version (empty: none committed yet)"}),
    }
    return rollup.rollup_version(versions), metadata


#: metadata values that are tables, markdown (pictures, tables as text) or JSON: what a run over a large range logs
#: once, on its roll-up's observation, not on every partition's materialization
_HEAVY = (dg.TableMetadataValue, dg.MarkdownMetadataValue, dg.JsonMetadataValue)
#: a run over at most this many partitions keeps all its metadata on its materializations (at most a few MB in all)
INLINE_UP_TO = 10


def _heavy(value: Any) -> bool:
    return isinstance(value, _HEAVY) or (isinstance(value, str) and len(value) > 200)


def observe_shards(context: dg.AssetExecutionContext, stage: str, dataset: str, storage: Storage,
                   prefix_of: Callable[[str], str], run_metadata: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Log the observation of ``stage``'s roll-up from the stage's own run, after its shards committed, and return
    the metadata for the run's materialization.

    Dagster copies a run's materialization metadata onto the event of *every* partition of the run: the per-shard
    table and the pictures of a 1,000-shard range would be stored 1,000 times (about 200 KB per event, and an
    asset page whose events list answered with 18 MB). So for a run over more than :data:`INLINE_UP_TO`
    partitions, the tables, markdown and pictures of ``run_metadata`` go once, on this observation, and the
    materialization keeps the figures (counts, rates, the location) and says where the rest is. A smaller run
    (one shard, a short range) keeps everything on its materializations."""
    version, metadata = _observation(context.instance, stage, dataset, storage, prefix_of)
    run_metadata = dict(run_metadata or {})
    keys = context.partition_keys if context.has_partition_key_range or context.has_partition_key else []
    moved: dict[str, Any] = {}
    if len(keys) > INLINE_UP_TO:
        moved = {k: v for k, v in run_metadata.items() if _heavy(v)}
        for k in moved:
            del run_metadata[k]
        if moved:
            run_metadata["run_details"] = dg.MetadataValue.md(
                f"This run covered {len(keys)} shards: its {', '.join(f'`{k}`' for k in moved)} are on the observation "
                f"of `{rollup_key(stage).to_user_string()}` that this run logged (that asset's Events), not repeated "
                "on every shard's materialization.")
    context.log_event(dg.AssetObservation(asset_key=rollup_key(stage), metadata={**metadata, **moved},
                                          tags={DATA_VERSION_TAG: version}))
    if metadata["changed"]:
        context.log.info(f"{rollup_key(stage).to_user_string()}: {metadata['changed']} shard(s) changed: "
                         f"{metadata['changed_shards']}")
    return run_metadata


def shard_rollup(stage: str, dataset: str, prefix_of: Callable[[str], str], group: str) -> dg.AssetsDefinition:
    """The observable roll-up of the sharded stage ``stage`` (see the module docstring)."""
    key = rollup_key(stage)
    with warnings.catch_warnings():  # observable source assets are marked beta
        warnings.simplefilter("ignore", dg.BetaWarning)

        @dg.multi_observable_source_asset(
            name=f"observe_{key.to_user_string()}", required_resource_keys={"storage"},
            specs=[dg.AssetSpec(key, deps=[stage], group_name=group, description=(
                f"Every shard of {stage} as one version: a digest of each shard's committed version in storage. The "
                f"stages that read all of {stage}'s shards depend on this, so a changed shard marks them stale at any "
                "shard count. Observed by every run of the stage; Observe re-reads storage."))],
        )
        def _observe(context) -> Any:
            version, metadata = _observation(context.instance, stage, dataset, context.resources.storage.get(),
                                             prefix_of)
            yield dg.ObserveResult(asset_key=key, data_version=dg.DataVersion(version), metadata=metadata)

    return _observe
