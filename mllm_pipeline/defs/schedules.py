"""The schedules, all **off by default**; turn them on in the UI or with ``dagster schedule start -w workspace.yaml``.

``retry_failed_<media asset>``  (one per media asset, nightly at 03:00 UTC by default, ``$MLLM_RETRY_CRON``)
    Reads the committed manifest of every shard of the asset and requests ``retry_failed: true`` runs for the
    shards that have failed rows worth retrying (every reason except those a retry cannot change:
    :data:`~mllm_pipeline.stages.media.NOT_RETRIED`), skipping shards whose raw shard has changed since (those need
    a full run, not a retry). Failed shards are grouped into **contiguous partition ranges, one run per range**: the
    media assets use a single-run backfill policy, so one process fetches a whole range, and shards in a range that
    have nothing to retry cost only a manifest read. A gap (a shard without failures, or never materialized) starts
    a new run, so the schedule never fetches a shard that was not already committed.

``storage_retention_weekly``
    Applies the retention rule with its defaults.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import dagster as dg

from mllm_pipeline.defs.jobs import DOWNLOAD_JOBS, retention_job
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS
from mllm_pipeline.defs.partitions import SHARDS, shard_index, shard_key
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.stages.media import retryable_failures
from mllm_pipeline.storage import Storage


def contiguous_ranges(keys: list[str]) -> list[tuple[str, str]]:
    """Group shard keys into runs of consecutive shards: [00, 01, 02, 05] -> [(00, 02), (05, 05)]."""
    out: list[tuple[str, str]] = []
    for index in sorted(shard_index(k) for k in keys):
        if out and shard_index(out[-1][1]) == index - 1:
            out[-1] = (out[-1][0], shard_key(index))
        else:
            out.append((shard_key(index), shard_key(index)))
    return out


def retry_requests(instance: dg.DagsterInstance, storage: Storage, asset_name: str, log: Any) -> Iterator[dg.RunRequest]:
    dataset = asset_name.split("_", 1)[1]
    partitions = instance.get_dynamic_partitions(SHARDS[dataset].name)
    from mllm_pipeline.sources.common import raw_shards

    try:
        digests = {shard_key(r.index): r.digest("media") for r in raw_shards(storage, dataset)}
    except FileNotFoundError:
        log.info(f"{asset_name}: raw_{dataset} has not been materialized; nothing to retry")
        return
    failing: dict[str, dict[str, int]] = {}
    for key in partitions:
        if key not in digests:
            continue
        reasons = retryable_failures(storage, dataset, key, digests[key])
        if reasons:
            failing[key] = reasons
    for start, end in contiguous_ranges(list(failing)):
        keys = [shard_key(i) for i in range(shard_index(start), shard_index(end) + 1)]
        n = sum(sum(failing[k].values()) for k in keys)
        log.info(f"{asset_name}: {start}...{end}: {n} failed row(s) to retry")
        tags = {"mllm/trigger": "retry_failed_downloads"}
        if start == end:
            partition = start
        else:
            partition = None
            tags |= {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}
        yield dg.RunRequest(
            run_key=f"{asset_name}:{start}...{end}",
            job_name=DOWNLOAD_JOBS[asset_name].name,
            partition_key=partition,
            run_config={"ops": {asset_name: {"config": {"retry_failed": True}}}},
            tags=tags,
        )


def retry_schedule(asset_name: str) -> dg.ScheduleDefinition:
    job = DOWNLOAD_JOBS[asset_name]

    @dg.schedule(
        name=f"retry_failed_{asset_name}",
        cron_schedule=os.environ.get("MLLM_RETRY_CRON", "0 3 * * *"),
        execution_timezone="UTC",
        target=job,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Nightly: re-attempt only the failed rows of {asset_name}'s committed shards "
        "(one run per contiguous range of shards with failures). Off by default.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext, storage: StorageResource):
        requests = list(retry_requests(context.instance, storage.get(), asset_name, context.log))
        return requests or dg.SkipReason(f"No committed shard of {asset_name} has failed rows to retry.")

    return _schedule


retention_schedule = dg.ScheduleDefinition(
    name="storage_retention_weekly", job=retention_job, cron_schedule="0 4 * * 0", execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Weekly: apply the retention rule with its defaults. Off by default.",
)

SCHEDULES = [*(retry_schedule(a.key.to_user_string()) for a in MEDIA_ASSETS), retention_schedule]
