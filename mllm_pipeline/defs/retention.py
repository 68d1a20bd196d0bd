"""The retention asset: the only thing that removes committed versions, by the rule in :mod:`mllm_pipeline.stages.lineage`.

Materialize ``storage_retention`` (group ``operations``) to see what the rule keeps and removes, and why; with
``dry_run: true`` nothing is removed. The schedule ``storage_retention_weekly`` runs it on Sundays; it is off by
default.
"""

from typing import Any

import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.stages.lineage import apply_retention, plan_retention


class RetentionConfig(dg.Config):
    keep_last: int = Field(default=3, description="Versions kept per output, newest first (the current one included).")
    min_age_hours: float = Field(default=24 * 7, description="A version superseded less than this long ago is kept.")
    dry_run: bool = Field(default=False, description="Only show what would be removed.")


@dg.asset(
    group_name="operations", kinds={"python"},
    description="Removes old versions of every output by an explicit rule: keeps the current and the last keep_last "
                "versions, those superseded less than min_age_hours ago, those a running job pinned, and everything a "
                "kept version read (media that kept manifests point at, manifests a kept checkpoint was trained on).",
)
def storage_retention(context: dg.AssetExecutionContext, config: RetentionConfig, storage: StorageResource) -> dg.MaterializeResult:
    st = storage.get()
    try:
        plan = plan_retention(st, keep_last=config.keep_last, min_age_hours=config.min_age_hours)
    except ValueError as e:
        raise dg.Failure(str(e)) from None
    done: dict[str, Any] = {"removed": 0, "kept": len(plan.keep), "bytes_freed": 0}
    if not config.dry_run:
        done = apply_retention(st, plan, context.log)
    context.log.info(f"retention: {len(plan.keep)} version(s) kept, {len(plan.remove)} "
                     f"{'would be ' if config.dry_run else ''}removed")
    reasons: dict[str, int] = {}
    for k in plan.keep:
        head = k["why"].split(" (")[0].split(" by ")[0]
        reasons[head] = reasons.get(head, 0) + 1
    return dg.MaterializeResult(metadata={
        "dry_run": config.dry_run,
        "versions_kept": len(plan.keep),
        "versions_removed": 0 if config.dry_run else done["removed"],
        "would_remove": len(plan.remove) if config.dry_run else 0,
        "bytes_freed": done["bytes_freed"],
        "pins": plan.pins,
        "kept_because": dg.MetadataValue.md(markdown_table([{"why": k, "versions": v} for k, v in sorted(reasons.items())], ["why", "versions"])),
        "removed": dg.MetadataValue.md(markdown_table(plan.remove[:200], ["prefix", "version", "why", "superseded_hours"])
                                       if plan.remove else "nothing to remove"),
        "kept": dg.MetadataValue.md(markdown_table(plan.keep[:200], ["prefix", "version", "why"])),
    })
