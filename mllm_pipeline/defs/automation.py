"""Automation: a sensor that re-ingests changed annotation files, and nightly retries of failed downloads.

Both are **off by default** (a new user's demo is never surprised by runs nobody asked for); turn them on in the
UI (**Automation**) or with ``dagster sensor start`` / ``dagster schedule start`` while the daemon runs.

``raw_annotation_files``  (sensor, every 60 s)
    Watches the input files of every raw asset and requests a run of exactly the raw asset(s) whose files are new
    or changed. What it watches:

    * ``$MLLM_WATCH_CONFIG``: a YAML file (local or ``s3://``) in the same shape as the run config you would pass
      to ``dagster asset materialize -c``, i.e. ``ops: {raw_cc3m: {config: {paths: [...]}}, ...}``. Each raw asset
      listed there is watched (``paths``, glob patterns allowed; ``directory`` for ``raw_cc3m_wds``) and its run
      gets that asset's config, so manual and sensor runs read the same files the same way.
    * without it, nothing: the sensor skips and says so (the demo can be watched like any data set, by pointing
      ``$MLLM_WATCH_CONFIG`` at the demo's ``raw.yaml``).

    The cursor keeps, per asset, a fingerprint of each watched file (size plus mtime for local files, size plus
    ETag for S3 objects) and of the asset's config. The run key is a digest of that state, so the same change is
    never requested twice, even if the cursor is lost. The first tick sees every file as new and requests every
    watched asset once.

``retry_failed_<media asset>``  (one schedule per media asset, nightly at 03:00 UTC by default)
    Reads the committed manifest of every shard of the asset and requests ``retry_failed: true`` runs for the
    shards that have failed rows worth retrying (every reason except ``refused_url`` and ``filtered``, which a
    retry cannot change), skipping shards whose raw shard has changed since (those need a full run, not a retry).
    Failed shards are grouped into **contiguous partition ranges, one run per range**: the media assets use a
    single-run backfill policy, so one process fetches a whole range, and shards in a range that have nothing to
    retry cost only a manifest read. A gap (a shard without failures, or never materialized) starts a new run, so
    the schedule never fetches a shard that was not already committed.

Long runs and the GPU:

* every run of the ``download_<media asset>`` jobs carries ``dagster/max_runtime`` (``$MLLM_DOWNLOAD_MAX_RUNTIME_S``,
  default 6 h); training runs should carry :data:`TRAINING_RUN_TAGS` (3 days) and use the pool
  :data:`GPU_POOL`. The tag only takes effect with ``run_monitoring: {enabled: true}`` in the instance's
  ``dagster.yaml`` (``docker/dagster.yaml`` has it, with an instance-wide default for every other run).
* pools (``downloads``, ``gpu``) get their limits from the instance: ``docker/dagster.yaml`` sets
  ``concurrency.pools.default_limit: 1`` (so ``gpu`` is one run at a time without further set-up) and the
  compose daemon sets ``downloads`` explicitly with ``dagster instance concurrency set``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any, Optional

import dagster as dg

from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS
from mllm_pipeline.defs.partitions import SHARDS, shard_index, shard_key
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.storage import Storage, filesystem_for, open_source

WATCH_CONFIG_ENV = "MLLM_WATCH_CONFIG"

#: The pool every GPU step (training) should use; with the instance's pool limit of 1, one such step per GPU.
GPU_POOL = "gpu"
#: The pool of the media downloads (set on the media assets).
DOWNLOADS_POOL = "downloads"
#: Tags for training jobs: run monitoring terminates a training run after 3 days.
TRAINING_RUN_TAGS = {"dagster/max_runtime": str(3 * 24 * 3600)}

#: Failure reasons a retry cannot change (the URL policy, the downloader's own filters); everything else is retried.
NOT_RETRIED = frozenset({"refused_url", "filtered", "opted_out"})

RAW_ASSET_NAMES = [a.key.to_user_string() for a in RAW_ASSETS]


def _download_max_runtime_s() -> int:
    raw = os.environ.get("MLLM_DOWNLOAD_MAX_RUNTIME_S", str(6 * 3600))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"MLLM_DOWNLOAD_MAX_RUNTIME_S must be a whole number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"MLLM_DOWNLOAD_MAX_RUNTIME_S must be positive, got {value}")
    return value


# -- the watched files ------------------------------------------------------------------------------------------


class WatchConfigError(ValueError):
    """The watch config file is missing or malformed; the message names the file and what was wrong."""


def load_watch_config(location: str) -> dict[str, dict[str, Any]]:
    """Read a run-config-shaped YAML file and return ``{raw asset: its op config}`` for the raw assets in it."""
    import yaml

    try:
        with open_source(location, "rb") as f:
            doc = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise WatchConfigError(f"{WATCH_CONFIG_ENV}={location}: the file does not exist.") from None
    except yaml.YAMLError as e:
        raise WatchConfigError(f"{WATCH_CONFIG_ENV}={location}: not valid YAML ({e}).") from None
    ops = doc.get("ops") if isinstance(doc, dict) else None
    if not isinstance(ops, dict):
        raise WatchConfigError(f"{location}: expected a run config with a top-level 'ops' mapping, "
                               f"e.g. ops: {{raw_cc3m: {{config: {{paths: [...]}}}}}}; found {type(ops).__name__}.")
    out: dict[str, dict[str, Any]] = {}
    for name, op in ops.items():
        if name not in RAW_ASSET_NAMES:
            continue  # other ops (media assets, ...) may share the file
        config = (op or {}).get("config") or {}
        if not isinstance(config, dict):
            raise WatchConfigError(f"{location}: ops.{name}.config must be a mapping.")
        if name == "raw_cc3m_wds":
            if not config.get("directory"):
                raise WatchConfigError(f"{location}: ops.raw_cc3m_wds.config.directory is empty; nothing to watch.")
        elif not config.get("paths") or not isinstance(config["paths"], list):
            raise WatchConfigError(f"{location}: ops.{name}.config.paths must be a non-empty list of files.")
        out[name] = config
    if not out:
        raise WatchConfigError(f"{location}: names none of the raw assets ({', '.join(RAW_ASSET_NAMES)}).")
    return out


def _with_scheme(original: str, found: str) -> str:
    if "://" in original and "://" not in found:
        return original.split("://", 1)[0] + "://" + found
    return found


def _fingerprint(info: dict[str, Any]) -> str:
    """size plus the object's ETag (S3) or modification time (local): what changes when the file does."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def list_watched_files(spec: list[str], directory: bool = False) -> dict[str, str]:
    """``{path: fingerprint}`` of the files named by ``spec`` (paths, glob patterns, or one directory's files)."""
    files: dict[str, str] = {}
    for entry in spec:
        fs, fs_path = filesystem_for(entry)
        if directory:
            found = fs.find(fs_path, detail=True)
        elif any(ch in entry for ch in "*?["):
            found = fs.glob(fs_path, detail=True)
        else:
            try:
                found = {fs_path: fs.info(fs_path)}
            except FileNotFoundError:
                continue
        for path, info in found.items():
            if info.get("type", "file") == "file":
                files[_with_scheme(entry, path)] = _fingerprint(info)
    return files


def watched_specs(cfg: dict[str, Any]) -> list[str]:
    """The files (or patterns) a raw asset's config reads: ``paths`` plus, for ``raw_msrvtt``, its split lists and
    MSRVTT-QA files, so a changed split list re-ingests like a changed annotation."""
    extra = [cfg[k] for k in ("train_list", "test_list") if cfg.get(k)]
    return list(cfg["paths"]) + extra + list(cfg.get("qa_paths") or [])


def _targets(storage: Storage) -> tuple[str, dict[str, tuple[dict[str, Any], list[str], bool]]]:
    """(what is watched, {asset: (its op config for the run, files to watch, whether it is a directory)})."""
    location = os.environ.get(WATCH_CONFIG_ENV)
    if location:
        configs = load_watch_config(location)
        return location, {
            name: (cfg, [cfg["directory"]] if name == "raw_cc3m_wds" else watched_specs(cfg), name == "raw_cc3m_wds")
            for name, cfg in configs.items()
        }
    return "", {}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_watch(storage: Storage, cursor: Optional[str], log: Any) -> tuple[list[dg.RunRequest], str, str]:
    """The sensor's logic without Dagster's context: (run requests, new cursor, a message when nothing changed)."""
    what, targets = _targets(storage)
    if not targets:
        return [], cursor or "{}", (f"Nothing to watch: set {WATCH_CONFIG_ENV} to a run-config YAML naming the raw "
                                    "assets' paths (the demo's is <storage root>/demo/run_config/raw.yaml).")
    previous: dict[str, Any] = json.loads(cursor) if cursor else {}
    state: dict[str, Any] = {}
    requests: list[dg.RunRequest] = []
    for asset, (config, spec, is_dir) in sorted(targets.items()):
        files = list_watched_files(spec, directory=is_dir)
        if not files:
            log.warning(f"{asset}: none of {spec} exists yet; not requested")
            if asset in previous:
                state[asset] = previous[asset]
            continue
        current = {"config": _digest(config), "files": files}
        state[asset] = current
        before = previous.get(asset)
        if before == current:
            continue
        old_files = (before or {}).get("files", {})
        changed = sorted(p for p in files if old_files.get(p) != files[p])
        gone = sorted(set(old_files) - set(files))
        log.info(f"{asset}: new or changed {changed or '-'}; gone {gone or '-'}"
                 + ("; config changed" if before and before.get("config") != current["config"] else ""))
        requests.append(dg.RunRequest(
            run_key=f"{asset}:{_digest(current)}",
            asset_selection=[dg.AssetKey(asset)],
            run_config={"ops": {asset: {"config": config}}} if config else {},
            tags={"mllm/trigger": "annotation_files_changed"},
        ))
    message = "" if requests else f"No new or changed annotation files in {what}."
    return requests, json.dumps(state, sort_keys=True), message


@dg.sensor(
    name="raw_annotation_files",
    target=dg.AssetSelection.assets(*RAW_ASSETS),
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests the raw asset(s) whose annotation files are new or changed ($MLLM_WATCH_CONFIG, else the "
    "nothing without it). Off by default.",
)
def raw_annotation_files_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    try:
        requests, cursor, message = evaluate_watch(storage.get(), context.cursor, context.log)
    except WatchConfigError as e:
        return dg.SensorResult(skip_reason=dg.SkipReason(str(e)))
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(message), cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


# -- nightly retries of failed downloads ------------------------------------------------------------------------


def download_job(asset: dg.AssetsDefinition) -> dg.UnresolvedAssetJobDefinition:
    name = asset.key.to_user_string()
    return dg.define_asset_job(
        f"download_{name}",
        selection=[asset],
        tags={"dagster/max_runtime": str(_download_max_runtime_s())},
        description=f"Fetch shards of {name} (one run per partition range); run monitoring ends a run after "
        "dagster/max_runtime seconds.",
    )


DOWNLOAD_JOBS = {a.key.to_user_string(): download_job(a) for a in MEDIA_ASSETS}


def retryable_failures(storage: Storage, dataset: str, shard: str, rows_digest: Optional[str]) -> dict[str, int]:
    """Failures by reason worth retrying in the committed media shard; {} when none, or when it is not committed
    or was made from other rows than the current raw shard's (a retry would be a full fetch then)."""
    try:
        manifest = storage.read_manifest(f"media/{dataset}/{shard}")
    except FileNotFoundError:
        return {}
    if rows_digest is not None and manifest.get("rows_digest") != rows_digest:
        return {}
    failed = manifest.get("summary", {}).get("failed_by_reason") or {}
    return {reason: n for reason, n in failed.items() if n and reason not in NOT_RETRIED}


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


SENSORS = [raw_annotation_files_sensor]
SCHEDULES = [retry_schedule(a.key.to_user_string()) for a in MEDIA_ASSETS]
JOBS = list(DOWNLOAD_JOBS.values())
