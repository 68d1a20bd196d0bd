"""The watermark stage on the storage root: every clip of a WebVid media shard scored, and what the manifests see.

Output per shard, ``curated/webvid_watermark/<shard>/<version>/``:

* ``scores.parquet`` — one row per clip: key, sample_id, score, is_watermarked, still, motion, bbox (clip pixels),
  static/template scores, the estimated region as a PNG, decision (keep / drop) and the reason;
* ``media.tar`` + ``samples.parquet`` — ``remove`` mode only: the media shard again, the flagged clips re-encoded
  with the region removed.

:func:`watermark_view` is how the manifests read it: ``drop`` leaves out the dropped clips, ``mask`` adds each
clip's region box, ``remove`` points at the cleaned clips.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.stages.media import TAR_NAME, MediaShardWriter, iter_shard, media_index, read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline.vision.watermark import MODES, WatermarkConfig, inpaint_clip, mask_from_png, mask_png, score_clips

NAME = "webvid_watermark"
#: Bump when scoring or the drop / mask / remove outputs change for the same clips and config.
CODE_VERSION = "watermark-3"
SCORES = "scores.parquet"
SCORES_SCHEMA = pa.schema([
    ("key", pa.string()), ("sample_id", pa.string()), ("score", pa.float64()), ("is_watermarked", pa.bool_()),
    ("still", pa.bool_()), ("motion", pa.float64()), ("bbox", pa.list_(pa.int32())), ("static_score", pa.float64()),
    ("template_score", pa.float64()), ("mask_png", pa.binary()), ("decision", pa.string()), ("reason", pa.string()),
    ("detail", pa.string())])


def _threshold(cfg: WatermarkConfig, res: Any) -> float:
    """The threshold that decided ``res``: the template's when the template decided, else the static-edge one."""
    if cfg.decision == "template" and res.template_score is not None:
        return cfg.template_threshold
    return cfg.still_threshold if res.still else cfg.threshold


def prefix(shard_key: str) -> str:
    return f"curated/{NAME}/{shard_key}"


def score_and_commit(st: Storage, shard_key: str, cfg: WatermarkConfig, mode: str, remove_method: str, log: Any) -> dict[str, Any]:
    """Score every clip of one WebVid media shard and commit the scores (and, in ``remove`` mode, the cleaned
    clips). Returns ``{"summary": counts, "rows": one dict per clip}``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, not {mode!r}")
    if mode == "remove" and remove_method not in ("alpha", "inpaint"):
        raise ValueError(f"remove_method must be 'alpha' or 'inpaint', not {remove_method!r}")
    media_manifest = st.read_manifest(f"media/webvid/{shard_key}")
    identity = {"stage": "watermark", "code": CODE_VERSION, "media": media_manifest["version"], "mode": mode,
                "remove_method": remove_method if mode == "remove" else None, "config": dataclasses.asdict(cfg)}
    done = st.up_to_date(prefix(shard_key), identity)
    if done is not None:
        log.info(f"[webvid {shard_key}] up to date: {done['version']} scored media {media_manifest['version']} with this config")
        scores = st.read_parquet(f"{prefix(shard_key)}/{done['version']}/{SCORES}")
        return {"summary": done["summary"], "rows": scores.drop_columns(["mask_png"]).to_pylist(), "up_to_date": True,
                "version": done["version"]}
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
                     "detail": f"score {res.score:.3f} >= {_threshold(cfg, res)}" if drop else None})
    elapsed = time.monotonic() - t0
    log.info(f"[webvid {shard_key}] scored {len(rows)} clip(s) in {elapsed:.1f}s "
             f"({len(rows) / max(elapsed, 1e-9):.1f} clips/s); {sum(1 for r in rows if r['is_watermarked'])} flagged")
    table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)
    media_ref = {"prefix": f"media/webvid/{shard_key}", "version": media_manifest["version"]}
    with st.new_version(prefix(shard_key), identity, inputs=[media_ref]) as version:
        st.write_parquet(version.rel(SCORES), table)
        removed = 0
        if mode == "remove":  # a full media shard (tar + status) of the clips, the flagged ones cleaned
            masks = {r["key"]: r["mask_png"] for r in rows if r["is_watermarked"] and r["mask_png"]}
            writer = MediaShardWriter(st, version)
            for key, files in iter_shard(st, "webvid", shard_key):
                if "mp4" in files and key in masks:
                    files = {**files, "mp4": inpaint_clip(files["mp4"], mask_from_png(masks[key]), method=remove_method, name=key)}
                    removed += 1
                writer.add(key, files)
            writer.close(read_status(st, "webvid", shard_key))
            log.info(f"[webvid {shard_key}] removed the overlay from {removed} clip(s)")
        summary = {"clips": len(rows), "flagged": sum(1 for r in rows if r["is_watermarked"]),
                   "still": sum(1 for r in rows if r["still"]), "decode_errors": sum(1 for r in rows if r["reason"] == "decode_error"),
                   "kept": sum(1 for r in rows if r["decision"] == "keep"), "dropped": sum(1 for r in rows if r["decision"] == "drop"),
                   "removed": removed, "seconds": round(elapsed, 2)}
        committed = version.commit({"kind": "webvid_watermark", "shard": shard_key, "mode": mode,
                                    "threshold": cfg.threshold, "config": dataclasses.asdict(cfg), "summary": summary,
                                    "media_version": media_manifest["version"]})
    return {"summary": summary, "rows": rows, "up_to_date": False, "version": committed["version"]}


def watermark_view(st: Storage, shard_key: str, media: pa.Table, m: dict[str, Any] | None) -> tuple[pa.Table, str]:
    """The WebVid media of one shard as the watermark stage (its committed manifest ``m``, or None when it has not
    run) left it (see the module doc), and a note. The caller checks that ``m`` scored this media version."""
    p = prefix(shard_key)
    if m is None:
        return media, "(no watermark stage: all clips used)"
    scores = st.read_parquet(f"{p}/{m['version']}/{SCORES}", ["key", "bbox", "decision"])
    mode = m["mode"]
    if mode == "drop":
        dropped = scores.filter(pc.equal(scores["decision"], "drop"))["key"]
        kept = media.filter(pc.invert(pc.is_in(media["media_key"], dropped)))
        return kept, f"(watermark: {media.num_rows - kept.num_rows} clip(s) dropped)"
    bbox_of = dict(zip(scores["key"].to_pylist(), scores["bbox"].to_pylist()))
    media = media.append_column("overlay_bbox", pa.array([bbox_of.get(k) for k in media["media_key"].to_pylist()], pa.list_(pa.int32())))
    if mode == "remove":
        media = media.set_column(media.column_names.index("media_tar"), "media_tar",
                                 pa.array([f"{p}/{m['version']}/{TAR_NAME}"] * media.num_rows, pa.string()))
        return media, "(watermark removed from flagged clips)"
    return media, "(watermark regions recorded)"
