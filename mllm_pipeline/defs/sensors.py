"""The sensors, all **off by default** (a new user's demo is never surprised by runs nobody asked for); turn them
on in the UI (**Automation**) or with ``dagster sensor start -w workspace.yaml`` while the daemon runs.

``raw_annotation_files``  (every 60 s)
    Watches the input files of every raw asset (:mod:`mllm_pipeline.stages.watch`: ``$MLLM_WATCH_CONFIG``, a
    run-config-shaped YAML naming the raw assets' files; without it, nothing) and requests a run of exactly the raw
    asset(s) whose files are new or changed, with that asset's config from the same file. The cursor keeps, per
    asset, a fingerprint of each watched file and of the asset's config. The run key is a digest of that state, so
    the same change is never requested twice, even if the cursor is lost. The first tick sees every file as new
    and requests every watched asset once.

``follow_upstream_changes``
    Declarative automation: the curated and manifest stages follow upstream changes (blocking checks that failed
    upstream hold them back).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import dagster as dg

from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.stages.watch import WATCH_CONFIG_ENV, WatchConfigError, list_watched_files, state_digest, watch_targets


def evaluate_watch(cursor: Optional[str], log: Any) -> tuple[list[dg.RunRequest], str, str]:
    """The sensor's logic without Dagster's context: (run requests, new cursor, a message when nothing changed)."""
    what, targets = watch_targets()
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
        current = {"config": state_digest(config), "files": files}
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
            run_key=f"{asset}:{state_digest(current)}",
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
def raw_annotation_files_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    try:
        requests, cursor, message = evaluate_watch(context.cursor, context.log)
    except WatchConfigError as e:
        return dg.SensorResult(skip_reason=dg.SkipReason(str(e)))
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(message), cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


follow_upstream = dg.AutomationConditionSensorDefinition(
    "follow_upstream_changes",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Materializes the stages whose automation condition says so (clean captions, the watermark stage, "
                "caption de-duplication, manifests) when their upstream changed. Off by default.",
)

SENSORS = [raw_annotation_files_sensor, follow_upstream]
