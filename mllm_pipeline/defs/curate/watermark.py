"""The watermark-filtered WebVid asset (partitioned like the WebVid shards). The work is in
:mod:`mllm_pipeline.stages.watermark` (scoring, the drop / mask / remove outputs, what the manifests see);
this module adds the config, the UI's metadata and pictures, and the check."""


import base64
import dataclasses
import io
import warnings
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.conditions import FOLLOW_UPSTREAM
from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.partitions import SHARDS, combined_version, observe_shards, shard_rollup
from mllm_pipeline.defs.plots import histogram
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.stages.media import iter_shard, media_index
from mllm_pipeline.storage import Storage
from mllm_pipeline.vision import WatermarkConfig
from mllm_pipeline.vision.frames import sample_frames
from mllm_pipeline.stages.watermark import CODE_VERSION, NAME, prefix, score_and_commit

WATERMARK_ASSET_KEY = dg.AssetKey(NAME)


class WatermarkAssetConfig(dg.Config):
    mode: str = Field(default="mask", description="mask (default: keep every clip, record the estimated region for "
                      "the loader; nearly every WebVid clip carries the mark, so drop would lose most of WebVid), drop "
                      "(leave out watermarked clips), remove (keep all, the region removed in the stored clips).")
    threshold: Optional[float] = Field(default=None, description="Static-edge score at or above which a clip without a template is watermarked (default: the calibrated value).")
    decision: str = Field(default="template", description="template (WebVid's one shared mark: where a template exists for the clip's frame shape, its score alone decides) or any (any static overlay).")
    template_threshold: Optional[float] = Field(default=None, description="Template score at or above which a clip is watermarked (default: the calibrated value).")
    frames: int = Field(default=16, description="Frames sampled per clip.")
    max_side: int = Field(default=256, description="Working size (longer side, pixels).")
    remove_method: str = Field(default="alpha", description="remove mode: alpha (reverse the blend where the template gives alpha) or inpaint (OpenCV).")

    def watermark_config(self) -> WatermarkConfig:
        base = WatermarkConfig()
        return dataclasses.replace(base, frames=self.frames, max_side=self.max_side,
                                   threshold=base.threshold if self.threshold is None else self.threshold,
                                   decision=self.decision, template_threshold=base.template_threshold
                                   if self.template_threshold is None else self.template_threshold)


def _example_sheet(st: Storage, shard_key: str, rows: list[dict[str, Any]], n: int = 8) -> str | None:
    """First frames of some clips with the estimated region drawn (red: dropped / flagged, green: kept)."""
    from PIL import Image, ImageDraw

    want = {r["key"]: r for r in (sorted(rows, key=lambda r: -r["score"])[: n // 2] + [r for r in rows if not r["is_watermarked"]][: n // 2])}
    cells: list[Image.Image] = []
    try:
        for key, files in iter_shard(st, "webvid", shard_key):
            r = want.get(key)
            if r is None or "mp4" not in files:
                continue
            sample = sample_frames(files["mp4"], n=1, max_side=None, gray=False)
            im = Image.fromarray(sample.frames[0]).convert("RGB")
            draw = ImageDraw.Draw(im)
            color = (230, 30, 30) if r["is_watermarked"] else (30, 200, 30)
            if r["bbox"]:
                draw.rectangle(list(r["bbox"]), outline=color, width=2)
            draw.text((3, 3), f"{r['score']:.2f}", fill=color)
            im.thumbnail((256, 256))
            cells.append(im)
            if len(cells) >= len(want):
                break
    except Exception:  # noqa: BLE001 -- a preview never fails the materialization
        return None
    if not cells:
        return None
    w = max(c.width for c in cells)
    h = max(c.height for c in cells)
    cols = min(4, len(cells))
    sheet = Image.new("RGB", (cols * w, -(-len(cells) // cols) * h), "white")
    for i, c in enumerate(cells):
        sheet.paste(c, ((i % cols) * w, (i // cols) * h))
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=85)
    return ("Estimated overlay regions (red: watermarked, green: kept; the number is the score):\n\n"
            f"![examples](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})")


with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)

    @dg.asset(
        name=NAME, group_name="curated", partitions_def=SHARDS["webvid"], deps=["videos_webvid"], kinds={"parquet"},
        backfill_policy=dg.BackfillPolicy.single_run(), code_version=CODE_VERSION, automation_condition=FOLLOW_UPSTREAM,
        check_specs=[dg.AssetCheckSpec("every_clip_scored", asset=NAME, description="A score (or a decode error) for every stored clip.")],
        description="WebVid clips scored for the static Shutterstock-style overlay (edge persistence + a template shared "
                    "across clips, motion-gated); drop, mask or remove, as configured.",
    )
    def webvid_watermark(context: dg.AssetExecutionContext, config: WatermarkAssetConfig, storage: StorageResource) -> dg.MaterializeResult:
        st = storage.get()
        try:
            cfg = config.watermark_config()
        except ValueError as e:
            raise dg.Failure(str(e)) from None
        totals: dict[str, int] = {}
        rows: list[dict[str, Any]] = []
        per_shard: list[dict[str, Any]] = []
        complete = True
        versions: list[str] = []
        for key in context.partition_keys:
            try:
                stored = media_index(st, "webvid", key).num_rows
            except FileNotFoundError as e:
                raise dg.Failure(f"{e} (materialize videos_webvid for {key} first)") from None
            try:
                out = score_and_commit(st, key, cfg, config.mode, config.remove_method, context.log)
            except ValueError as e:
                raise dg.Failure(str(e)) from None
            s = out["summary"]
            versions.append(out["version"])
            context.add_asset_metadata({"version": out["version"], "up_to_date": out["up_to_date"]}, partition_key=key)
            complete &= s["clips"] == stored
            per_shard.append({"shard": key, **s})
            for k, v in s.items():
                totals[k] = totals.get(k, 0) + v
            rows += out["rows"]
        scores = [r["score"] for r in rows if r["score"] is not None]
        md: dict[str, Any] = {
            "mode": config.mode, "threshold": cfg.threshold, "clips": totals.get("clips", 0),
            "flagged": totals.get("flagged", 0), "kept": totals.get("kept", 0), "dropped": totals.get("dropped", 0),
            "still_clips": totals.get("still", 0), "decode_errors": totals.get("decode_errors", 0),
            "shards": dg.MetadataValue.md(markdown_table(per_shard, ["shard", "clips", "flagged", "kept", "dropped", "removed", "still", "seconds"])),
        }
        pic = histogram({"clips": scores}, "watermark score", "score", bins=25, vline=cfg.threshold)
        if pic:
            md["score_histogram"] = dg.MetadataValue.md(pic)
        if context.partition_keys:
            sheet = _example_sheet(st, context.partition_keys[0], [r for r in rows if r["score"] is not None])
            if sheet:
                md["examples"] = dg.MetadataValue.md(sheet)
        md = observe_shards(context, NAME, "webvid", st, prefix, md)
        return dg.MaterializeResult(metadata=md, check_results=[dg.AssetCheckResult(
            check_name="every_clip_scored", passed=bool(complete), metadata={"clips": totals.get("clips", 0)})],
            data_version=dg.DataVersion(combined_version(versions)))


#: its roll-up (defs/partitions.py): what the manifests depend on
WATERMARK_ROLLUP = shard_rollup(NAME, "webvid", prefix, "curated")
