"""The watermark-filtered WebVid: every downloaded clip scored for a static overlay, then dropped, masked or
cleaned, by the mode the user picks (domain code: :mod:`mllm_pipeline.vision.watermark`).

Output per WebVid shard, ``curated/webvid_watermark/<shard>/<version>/``:

* ``scores.parquet`` — one row per clip: key, sample_id, score, is_watermarked, still, motion, bbox (clip pixels),
  static/template scores, the estimated region as a PNG, decision (keep / drop) and the reason;
* ``media.tar`` — ``remove`` mode only: every clip, the flagged ones re-encoded with the region removed.

The manifests read this: ``drop`` leaves out the dropped clips, ``mask`` adds each clip's region box, ``remove``
points at the cleaned clips.
"""


import base64
import dataclasses
import io
import tarfile
import time
import warnings
from typing import Any, Optional

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.partitions import SHARDS
from mllm_pipeline.defs.plots import histogram
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.download.shards import iter_shard, media_index
from mllm_pipeline.storage import Storage
from mllm_pipeline.vision import MODES, WatermarkConfig, inpaint_clip, mask_from_png, mask_png, score_clips
from mllm_pipeline.vision.frames import sample_frames

NAME = "webvid_watermark"
WATERMARK_ASSET_KEY = dg.AssetKey(NAME)
SCORES = "scores.parquet"
TAR = "media.tar"


class WatermarkAssetConfig(dg.Config):
    mode: str = Field(default="drop", description="drop (leave out watermarked clips), mask (keep all, record the "
                      "region for the loader), remove (keep all, the region inpainted in the stored clips).")
    threshold: Optional[float] = Field(default=None, description="Score at or above which a clip is watermarked (default: the calibrated value).")
    frames: int = Field(default=16, description="Frames sampled per clip.")
    max_side: int = Field(default=256, description="Working size (longer side, pixels).")
    remove_method: str = Field(default="alpha", description="remove mode: alpha (reverse the blend where the template gives alpha) or inpaint (OpenCV).")

    def watermark_config(self) -> WatermarkConfig:
        base = WatermarkConfig()
        return dataclasses.replace(base, frames=self.frames, max_side=self.max_side,
                                   threshold=base.threshold if self.threshold is None else self.threshold)


def prefix(shard_key: str) -> str:
    return f"curated/{NAME}/{shard_key}"


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


def score_shard(st: Storage, shard_key: str, cfg: WatermarkConfig, mode: str, remove_method: str, log: Any) -> dict[str, Any]:
    media = media_index(st, "webvid", shard_key)
    sample_of = dict(zip(media["media_key"].to_pylist(), media["sample_id"].to_pylist()))
    source = lambda: ((k, f["mp4"]) for k, f in iter_shard(st, "webvid", shard_key) if "mp4" in f)  # noqa: E731
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for key, res in score_clips(source, cfg):
        if isinstance(res, Exception):
            rows.append({"key": key, "sample_id": sample_of.get(key), "score": None, "is_watermarked": None, "still": None,
                         "motion": None, "bbox": None, "static_score": None, "template_score": None, "mask_png": None,
                         "decision": "drop", "reason": "decode_error", "detail": str(res)[:300]})
            continue
        flagged = bool(res.is_watermarked)
        drop = flagged and mode == "drop"
        rows.append({"key": key, "sample_id": sample_of.get(key), "score": float(res.score), "is_watermarked": flagged,
                     "still": bool(res.still), "motion": float(res.motion), "bbox": list(res.bbox) if res.bbox else None,
                     "static_score": float(res.static_score),
                     "template_score": None if res.template_score is None else float(res.template_score),
                     "mask_png": mask_png(res.mask) if res.mask is not None and res.mask.any() else None,
                     "decision": "drop" if drop else "keep", "reason": "watermark" if drop else None,
                     "detail": f"score {res.score:.3f} >= {cfg.threshold}" if drop else None})
    elapsed = time.monotonic() - t0
    log.info(f"[webvid {shard_key}] scored {len(rows)} clip(s) in {elapsed:.1f}s "
             f"({len(rows) / max(elapsed, 1e-9):.1f} clips/s); {sum(1 for r in rows if r['is_watermarked'])} flagged")
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("key", pa.string()), ("sample_id", pa.string()), ("score", pa.float64()), ("is_watermarked", pa.bool_()),
        ("still", pa.bool_()), ("motion", pa.float64()), ("bbox", pa.list_(pa.int32())), ("static_score", pa.float64()),
        ("template_score", pa.float64()), ("mask_png", pa.binary()), ("decision", pa.string()), ("reason", pa.string()),
        ("detail", pa.string())]))
    with st.new_version(prefix(shard_key)) as version:
        with st.open(version.rel(SCORES), "wb") as f:
            pq.write_table(table, f, compression="zstd")
        removed = 0
        if mode == "remove":
            masks = {r["key"]: r["mask_png"] for r in rows if r["is_watermarked"] and r["mask_png"]}
            with st.open(version.rel(TAR), "wb") as raw, tarfile.open(fileobj=raw, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for key, files in iter_shard(st, "webvid", shard_key):
                    for ext, data in files.items():
                        if ext == "mp4" and key in masks:
                            data = inpaint_clip(data, mask_from_png(masks[key]), method=remove_method, name=key)
                            removed += 1
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime = len(data), int(time.time())
                        tar.addfile(info, io.BytesIO(data))
            log.info(f"[webvid {shard_key}] removed the overlay from {removed} clip(s)")
        summary = {"clips": len(rows), "flagged": sum(1 for r in rows if r["is_watermarked"]),
                   "still": sum(1 for r in rows if r["still"]), "decode_errors": sum(1 for r in rows if r["reason"] == "decode_error"),
                   "kept": sum(1 for r in rows if r["decision"] == "keep"), "dropped": sum(1 for r in rows if r["decision"] == "drop"),
                   "removed": removed, "seconds": round(elapsed, 2)}
        version.commit({"kind": "webvid_watermark", "shard": shard_key, "mode": mode, "threshold": cfg.threshold,
                        "config": dataclasses.asdict(cfg), "summary": summary,
                        "media_version": st.read_manifest(f"media/webvid/{shard_key}")["version"]})
    return {"summary": summary, "rows": rows}


with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)

    @dg.asset(
        name=NAME, group_name="curated", partitions_def=SHARDS["webvid"], deps=["videos_webvid"], kinds={"parquet"},
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[dg.AssetCheckSpec("every_clip_scored", asset=NAME, description="A score (or a decode error) for every stored clip.")],
        description="WebVid clips scored for the static Shutterstock-style overlay (edge persistence + a template shared "
                    "across clips, motion-gated); drop, mask or remove, as configured.",
    )
    def webvid_watermark(context: dg.AssetExecutionContext, config: WatermarkAssetConfig, storage: StorageResource) -> dg.MaterializeResult:
        st = storage.get()
        if config.mode not in MODES:
            raise dg.Failure(f"mode must be one of {list(MODES)}, not {config.mode!r}")
        try:
            cfg = config.watermark_config()
        except ValueError as e:
            raise dg.Failure(str(e)) from None
        totals: dict[str, int] = {}
        rows: list[dict[str, Any]] = []
        per_shard: list[dict[str, Any]] = []
        complete = True
        for key in context.partition_keys:
            try:
                stored = media_index(st, "webvid", key).num_rows
            except FileNotFoundError as e:
                raise dg.Failure(f"{e} (materialize videos_webvid for {key} first)") from None
            out = score_shard(st, key, cfg, config.mode, config.remove_method, context.log)
            s = out["summary"]
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
        return dg.MaterializeResult(metadata=md, check_results=[dg.AssetCheckResult(
            check_name="every_clip_scored", passed=bool(complete), metadata={"clips": totals.get("clips", 0)})])


def watermark_view(st: Storage, shard_key: str, media: pa.Table) -> tuple[pa.Table, str]:
    """The WebVid media of one shard as the watermark stage left it (see the module doc), and a note."""
    p = prefix(shard_key)
    if not st.exists(f"{p}/_manifest.json"):
        return media, "(no watermark stage: all clips used)"
    m = st.read_manifest(p)
    media_version = st.read_manifest(f"media/webvid/{shard_key}")["version"]
    if m.get("media_version") != media_version:
        return media, "(watermark scores are older than the media shard: materialize webvid_watermark again)"
    with st.open(f"{p}/{m['version']}/{SCORES}") as f:
        scores = pq.read_table(f, columns=["key", "bbox", "decision"])
    mode = m["mode"]
    if mode == "drop":
        dropped = scores.filter(pc.equal(scores["decision"], "drop"))["key"]
        kept = media.filter(pc.invert(pc.is_in(media["media_key"], dropped)))
        return kept, f"(watermark: {media.num_rows - kept.num_rows} clip(s) dropped)"
    bbox_of = dict(zip(scores["key"].to_pylist(), scores["bbox"].to_pylist()))
    media = media.append_column("overlay_bbox", pa.array([bbox_of.get(k) for k in media["media_key"].to_pylist()], pa.list_(pa.int32())))
    if mode == "remove":
        media = media.set_column(media.column_names.index("media_tar"), "media_tar",
                                 pa.array([f"{p}/{m['version']}/{TAR}"] * media.num_rows, pa.string()))
        return media, "(watermark removed from flagged clips)"
    return media, "(watermark regions recorded)"



