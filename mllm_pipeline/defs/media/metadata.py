"""Metadata and check results for media-shard runs: per-shard accounting, failure reasons, a contact sheet."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import dagster as dg

from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.tables import table
from mllm_pipeline.download.accounting import REASONS as REASON_MEANINGS
from mllm_pipeline.stages.media import ShardOutcome
from mllm_pipeline.stages.media import iter_shard, read_status
from mllm_pipeline.storage import Storage



def _meaning(reason: str) -> str:
    if reason.startswith("http_") and reason not in REASON_MEANINGS:
        return f"HTTP status {reason[5:]}"
    return REASON_MEANINGS.get(reason, "")


SHARD_COLUMNS = ["shard", "this_run", "attempted", "succeeded", "success_rate", "failed_by_reason", "seconds"]


def media_metadata(storage: Storage, dataset: str, media_kind: str, outcomes: list[ShardOutcome], totals: dict[str, Any]) -> dict[str, Any]:
    shards = [
        {
            "shard": o.shard_key,
            "this_run": "skipped: " + o.reason if o.skipped else o.reason,
            "attempted": o.summary["attempted"],
            "succeeded": o.summary["succeeded"],
            "success_rate": round(float(o.summary["success_rate"]), 4),
            "failed_by_reason": ", ".join(f"{k} {v}" for k, v in o.summary["failed_by_reason"].items()) or "-",
            "seconds": round(float(o.seconds), 1),
        }
        for o in outcomes
    ]
    reasons = [{"reason": k, "samples": v, "meaning": _meaning(k)} for k, v in totals["failed_by_reason"].items()]
    md: dict[str, Any] = {
        "dagster/row_count": totals["succeeded"],
        "attempted": totals["attempted"],
        "succeeded": totals["succeeded"],
        "failed": totals["failed"],
        "success_rate": round(totals["success_rate"], 4),
        "failed_by_reason": table(reasons, ["reason", "samples", "meaning"]),
        "shards": table(shards, SHARD_COLUMNS),
        "fetched_this_run": sum(o.fetched_rows for o in outcomes),
        "location": dg.MetadataValue.path(storage.uri(f"media/{dataset}")),
    }
    if outcomes:
        first = outcomes[0]
        md["failure_examples"] = dg.MetadataValue.md(_failure_examples(storage, dataset, outcomes))
        sheet = _contact_sheet(storage, dataset, first.shard_key, media_kind)
        if sheet:
            md["preview"] = dg.MetadataValue.md(sheet)
    return md


def _failure_examples(storage: Storage, dataset: str, outcomes: list[ShardOutcome], limit: int = 8) -> str:
    rows: list[dict[str, Any]] = []
    for o in outcomes:
        if not o.summary["failed"]:
            continue
        status = read_status(storage, dataset, o.shard_key)
        for r in status.to_pylist():
            if r["status"] != "success":
                rows.append({"shard": o.shard_key, "sample_id": r["sample_id"], "reason": r["reason"], "detail": r["detail"]})
                if len(rows) >= limit:
                    return markdown_table(rows, ["shard", "sample_id", "reason", "detail"])
    return markdown_table(rows, ["shard", "sample_id", "reason", "detail"]) if rows else "no failures"


def _contact_sheet(storage: Storage, dataset: str, shard_key: str, media_kind: str, n: int = 12, cell: int = 128) -> str | None:
    """A grid of the first ``n`` samples of a shard (the first frame for videos), as an inline JPEG."""
    from PIL import Image, ImageDraw

    thumbs: list[tuple[Image.Image, str]] = []
    try:
        for key, files in iter_shard(storage, dataset, shard_key):
            media = next((files[e] for e in files if e not in ("txt", "json")), None)
            if media is None:
                continue
            im = _first_frame(media) if media_kind == "video" else Image.open(io.BytesIO(media))
            im = im.convert("RGB")
            im.thumbnail((cell, cell))
            caption = json.loads(files.get("json", b"{}")).get("sample_id", key)
            thumbs.append((im, str(caption)))
            if len(thumbs) >= n:
                break
    except Exception:  # noqa: BLE001 -- a preview must never fail the materialization
        return None
    if not thumbs:
        return None
    cols = min(6, len(thumbs))
    rows = -(-len(thumbs) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, caption) in enumerate(thumbs):
        x, y = (i % cols) * cell, (i // cols) * (cell + 14)
        sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        draw.text((x + 2, y + cell), caption[:20], fill="black")
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=80)
    return f"First samples of {shard_key}:\n\n![preview](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"


def _first_frame(data: bytes):
    import av

    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            return frame.to_image()
    raise ValueError("no frame")


def media_checks(outcomes: list[ShardOutcome], min_success_rate: float) -> list[dg.AssetCheckResult]:
    low = [o for o in outcomes if o.summary["success_rate"] < min_success_rate]
    rates = {o.shard_key: round(o.summary["success_rate"], 4) for o in outcomes}
    return [
        dg.AssetCheckResult(
            check_name="success_rate",
            passed=not low,
            metadata={"min_success_rate": min_success_rate, "success_rate_by_shard": table(
                [{"shard": k, "success_rate": v} for k, v in rates.items()], ["shard", "success_rate"])},
            description=(f"{len(low)} shard(s) below {min_success_rate:.0%}: " + ", ".join(o.shard_key for o in low[:20])) if low else None,
        ),
    ]
