"""Turn an :class:`~mllm_pipeline.sources.common.IngestReport` into Dagster metadata and check results."""

from __future__ import annotations

from typing import Any

import dagster as dg

from mllm_pipeline.defs.tables import small_json_or_table, table

from mllm_pipeline.redact import redact_text
from mllm_pipeline.sources.common import REASONS, IngestReport

QUARANTINE_WARN_RATE = 0.05


def _cell(value: Any, width: int = 80) -> str:
    text = "" if value is None else redact_text(str(value))  # no secret of a URL in any metadata table
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "_(no rows)_"
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows)


def report_metadata(report: IngestReport) -> dict[str, Any]:
    reasons = [
        {"reason": k, "rows": int(v), "meaning": REASONS.get(k, "")}
        for k, v in sorted(report.quarantined.items(), key=lambda kv: -kv[1])
    ]
    preview_cols = [c for c in ("sample_id", "split", "media_kind", "url", "path", "captions", "clip_start_s", "clip_end_s", "duration_s", "source_line")
                    if report.preview and any(r.get(c) is not None for r in report.preview)]
    md: dict[str, Any] = {
        "dagster/row_count": report.rows_kept,
        "rows_in": report.rows_in,
        "rows_kept": report.rows_kept,
        "rows_quarantined": report.rows_quarantined,
        "quarantine_by_reason": table(reasons, ["reason", "rows", "meaning"]),
        "shard_count": len(report.shards),
        "rows_per_shard": max((s["rows"] for s in report.shards), default=0),
        "location": dg.MetadataValue.path(report.location),
        "manifest": dg.MetadataValue.path(report.manifest_uri),
        "sources": dg.MetadataValue.json(report.sources),
        "preview": dg.MetadataValue.md(markdown_table(report.preview, preview_cols)),
        "seconds": round(report.seconds, 2),
        "rows_per_second": round(report.rows_in / report.seconds) if report.seconds > 0 else 0,
    }
    for k, v in report.extra.items():
        md[k] = small_json_or_table(v) if isinstance(v, (dict, list)) else v
    if report.extra.get("eval_sets"):  # declared evaluation sets: one row each, read at a glance
        md["eval_sets"] = dg.MetadataValue.md(markdown_table(
            report.extra["eval_sets"], ["name", "split", "entries", "found", "not_found", "file"]))
    if report.extra.get("file_kinds"):
        md["file_kinds"] = dg.MetadataValue.md(markdown_table(
            [{"file": f, "kind": k} for f, k in report.extra["file_kinds"].items()], ["file", "kind"]))
    return md


def quarantine_result(report: IngestReport) -> dg.AssetCheckResult:
    """The quarantine-rate warning of a committed raw version (the ``quarantine_rate`` check,
    :mod:`mllm_pipeline.defs.checks`)."""
    rate = report.rows_quarantined / report.rows_in if report.rows_in else 0.0
    return dg.AssetCheckResult(
        check_name="quarantine_rate",
        passed=rate <= QUARANTINE_WARN_RATE,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"quarantine_rate": round(rate, 4), "threshold": QUARANTINE_WARN_RATE},
        description=None if rate <= QUARANTINE_WARN_RATE else f"{rate:.1%} of the rows were set aside; see quarantine_by_reason.",
    )
