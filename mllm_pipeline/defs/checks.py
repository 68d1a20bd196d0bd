"""The accounting checks: each reads back what its asset committed and compares it with the inputs it was made
from (:mod:`mllm_pipeline.stages.verify`), so it can fail, and it can run on its own from the UI ("Execute" on the check)
without materializing anything.

* ``rows_accounted`` (raw assets): every record of every source file is in the raw shards or the quarantine, once;
* ``samples_accounted`` (media assets): every raw row is in the status table once; every success is in the tar and
  decodes (at commit: the tar holds exactly the bytes written, each decoded when it was fetched);
* ``captions_accounted`` (clean-caption assets): every caption of the raw shard is in ``kept`` or ``rejected``;
* ``nothing_silently_lost`` (manifests): every kept caption with usable media is in a split or set aside with a
  reason.

All four are blocking: a downstream asset in the same run does not start on output that failed. The partitioned
assets' checks verify the partitions of the run they are part of (reporting, for each shard, the verdict its
commit recorded: a shard the run found up to date is not read back again), and read every committed shard back
when run on their own.
"""


from collections.abc import Callable

import dagster as dg

from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.storage import Storage
from mllm_pipeline.stages.gate import verified_at_commit
from mllm_pipeline.stages.registry import DATASETS
from mllm_pipeline.stages.verify import (
    Verdict,
    combine,
    verify_caption_shard,
    verify_eval_splits,
    verify_manifests,
    verify_media_shard,
    verify_raw,
)
from mllm_pipeline.stages.media import committed_shards

RAW = {d.raw_asset: (d.name, d.raw_prefix) for d in DATASETS.values()}
MEDIA = {d.media_asset: d.name for d in DATASETS.values()}
CAPTIONS = {d.captions_asset: d.name for d in DATASETS.values()}

DESCRIPTIONS = {
    "rows_accounted": "Reads the source files again and the committed raw shards and quarantine: every record (line of "
                      "a TSV/CSV/JSONL file, entry of a JSON document, sample of a tar) is a raw row or quarantined, "
                      "exactly once. A failure names the file and line (or JSON locator).",
    "samples_accounted": "Reads the committed media shards back: every raw row is in the status table exactly once, "
                         "every success has its media member in media.tar, and that member decodes. At commit, and "
                         "in a run reporting the commit's verdict, media.tar is compared with the sha256 recorded as "
                         "it was written instead (each success was decoded when fetched); executed on its own, every "
                         "member is decoded again. A failure names the shard, the sample id and the tar member.",
    "captions_accounted": "Reads the committed clean-caption shards back: every caption of the raw shard is in kept or "
                          "in rejected (with a reason), exactly once. A failure names the sample id and caption index.",
    "evaluation_splits_whole": "Reads the raw rows the manifests were built from and the committed manifests: every "
                               "evaluation-split sample (MSR-VTT test, COCO val, ...) whose media is stored is in the "
                               "manifests with every one of its captions. A failure names the sample and what it lost.",
    "nothing_silently_lost": "Reads the committed manifests back: every kept caption whose media is stored is in exactly "
                             "one split, or set aside with a reason (rejected.parquet, caption de-duplication, the "
                             "watermark stage). A failure names the caption id.",
}


def check_result(verdict: Verdict) -> dg.AssetCheckResult:
    """A verdict as the UI shows it: pass/fail, the message naming what is missing, counts, the first problems."""
    md: dict[str, object] = {k: dg.MetadataValue.int(v) for k, v in verdict.counts.items()}
    md["problem_count"] = dg.MetadataValue.int(verdict.problem_count)
    md["verified"] = dg.MetadataValue.text(verdict.subject)
    if verdict.problems:
        rows = "".join(f"| {i} | {p.replace('|', '/')} |\n" for i, p in enumerate(verdict.problems, 1))
        md["first_problems"] = dg.MetadataValue.md(f"| # | problem |\n|---|---|\n{rows}")
    return dg.AssetCheckResult(passed=verdict.passed, metadata=md, description=verdict.message[:2000])


def _run_partitions(context: dg.AssetCheckExecutionContext) -> list[str] | None:
    """The partition keys of the run this check is part of; None when it runs without partitions (on its own)."""
    try:
        if context.has_partition_key or context.has_partition_key_range:
            return list(context.partition_keys)
    except Exception:  # noqa: BLE001 -- an unpartitioned check step in a run without partitions
        return None
    return None


def _run_start(context: dg.AssetCheckExecutionContext) -> float | None:
    """When the run of this check started (UNIX time), or None when the instance does not say."""
    try:
        record = context.instance.get_run_record_by_id(context.run.run_id)
    except Exception:  # noqa: BLE001 -- an instance without run records: verify again
        return None
    if record is None:
        return None
    return record.start_time or record.create_timestamp.timestamp()


def _verdict(context: dg.AssetCheckExecutionContext, st: Storage, name: str, prefix: str,
             verify: Callable[[], Verdict]) -> Verdict:
    """The verdict the commit gate recorded for the current version of ``prefix`` in this run, else a new one."""
    return verified_at_commit(st.current(prefix), name, _run_start(context)) or verify()


def _shard_check(asset: str, name: str, what: str, dataset: str,
                 verify: Callable[[Storage, str, str], Verdict]) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name=name, blocking=True, description=DESCRIPTIONS[name])
    def _check(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        st = storage.get()
        in_run = _run_partitions(context)
        keys = in_run or committed_shards(st, dataset, what)
        if not keys:
            v = Verdict(f"{what}/{dataset}")
            v.problem(f"no committed shard under {what}/{dataset}: materialize {asset} first")
            return check_result(v)
        # In a run, a shard's current version is the one its commit verified, whenever that was (a version never
        # changes once committed): a shard the run skipped as up to date is not read back again, which at 332
        # shards would re-read every sample of the dataset after every run. On its own, the check reads every
        # committed shard back.
        since = 0.0 if in_run else None
        return check_result(combine(f"{asset} ({len(keys)} shard(s))", (
            verified_at_commit(st.current(f"{what}/{dataset}/{k}"), name, since) or verify(st, dataset, k)
            for k in keys)))

    return _check


def _raw_check(asset: str, dataset: str, prefix: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name="rows_accounted", blocking=True, description=DESCRIPTIONS["rows_accounted"])
    def _check(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        st = storage.get()
        return check_result(_verdict(context, st, "rows_accounted", prefix, lambda: verify_raw(st, dataset, prefix)))

    return _check


def _quarantine_check(asset: str, prefix: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name="quarantine_rate", description="Warns when more than 5% of the rows of the "
                    "committed version were set aside (quarantine_by_reason says why).")
    def _check(storage: StorageResource) -> dg.AssetCheckResult:
        from mllm_pipeline.defs.ingest.metadata import quarantine_result
        from mllm_pipeline.stages.raw import report_from_manifest

        st = storage.get()
        return quarantine_result(report_from_manifest(st, prefix, st.read_manifest(prefix)))

    return _check


@dg.asset_check(asset="manifests", name="nothing_silently_lost", blocking=True,
                description=DESCRIPTIONS["nothing_silently_lost"])
def nothing_silently_lost(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    st = storage.get()
    return check_result(_verdict(context, st, "nothing_silently_lost", "manifests", lambda: verify_manifests(st)))


@dg.asset_check(asset="manifests", name="evaluation_splits_whole", blocking=True,
                description=DESCRIPTIONS["evaluation_splits_whole"])
def evaluation_splits_whole(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    st = storage.get()
    return check_result(_verdict(context, st, "evaluation_splits_whole", "manifests", lambda: verify_eval_splits(st)))


#: asset name -> its accounting check
ACCOUNTING_CHECKS: dict[str, dg.AssetChecksDefinition] = {
    **{a: _raw_check(a, d, p) for a, (d, p) in RAW.items()},
    **{a: _shard_check(a, "samples_accounted", "media", d, verify_media_shard) for a, d in MEDIA.items()},
    **{a: _shard_check(a, "captions_accounted", "captions", d, verify_caption_shard) for a, d in CAPTIONS.items()},
    "manifests": nothing_silently_lost,
}

#: raw asset name -> its quarantine-rate warning
QUARANTINE_CHECKS: dict[str, dg.AssetChecksDefinition] = {a: _quarantine_check(a, p) for a, (_, p) in RAW.items()}

#: checks beyond the one accounting check per asset
OTHER_CHECKS: list[dg.AssetChecksDefinition] = [evaluation_splits_whole, *QUARANTINE_CHECKS.values()]
