"""MSR-VTT from the official ``videodatainfo`` JSON, or from the flat caption list some releases ship.

Accepted layouts:

* **Official** (``train_val_videodatainfo.json``, ``test_videodatainfo.json``, ``videodatainfo_2017.json``,
  ``MSRVTT_data.json``): ``{"info", "videos": [{"video_id", "category", "url", "start time", "end time",
  "split", "id"}], "sentences": [{"video_id", "caption", "sen_id"}]}``. 10,000 videos, 20 captions each, split
  into train / validate / test of 6,513 / 497 / 2,990 videos (often misquoted as 6,153 and 2,090).
* **Flat**: ``[{"video": "video9770.mp4", "caption": "...", "duration": 10.8}, ...]``, one entry per caption.

A file with ``videos`` (and their categories) but no ``sentences`` is the category-only annotation that some
retrieval releases ship; it stops with a message saying where the captions are.

One row per video, all its captions kept (so a video is fetched once). With ``videos_dir`` the media are the
local ``<videos_dir>/<video_id>.mp4`` files; otherwise the YouTube URL with the clip's start and end times.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pyarrow as pa

from mllm_pipeline.sources.common import (
    DEFAULT_ROWS_PER_SHARD,
    IngestReport,
    RawIngest,
    SourceFormatError,
    base_table,
    quarantine_table,
    reason_details,
)
from mllm_pipeline.storage import Storage, filesystem_for, open_source

DATASET = "msrvtt"
OFFICIAL_SPLIT_SIZES = {"train": 6513, "validate": 497, "test": 2990}
CAPTIONS_HINT = (
    "The captions are in the official MSR-VTT annotation 'train_val_videodatainfo.json' / 'test_videodatainfo.json' "
    "(also shipped as 'MSRVTT_data.json' with the CLIP4Clip data), whose top level has 'info', 'videos' and "
    "'sentences'; or give the flat [{video, caption, duration}] list."
)


def load_json(path: str) -> Any:
    with open_source(path) as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise SourceFormatError(path, "a UTF-8 JSON document", f"bytes that are not UTF-8 at offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise SourceFormatError(path, "a JSON document", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _local_names(videos_dir: str | None) -> set[str] | None:
    if not videos_dir:
        return None
    fs, root = filesystem_for(videos_dir)
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        raise SourceFormatError(videos_dir, "a directory of MSR-VTT videos (video0.mp4 ...)", "no such directory") from None


def ingest_msrvtt(
    paths: list[str],
    storage: Storage,
    *,
    videos_dir: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    logger: Any = None,
    identity: Any = None,
) -> IngestReport:
    """Read MSR-VTT annotation file(s) and commit one raw row per video under ``raw/msrvtt``."""
    local = _local_names(videos_dir)
    split_counts: dict[str, int] = defaultdict(int)
    captions_total = 0
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, logger=logger, identity=identity) as ing:
        for path in paths:
            ing.begin_source(path)
            doc = load_json(path)
            if isinstance(doc, dict) and "videos" in doc and "sentences" not in doc:
                raise SourceFormatError(
                    path,
                    "MSR-VTT annotations with captions ('sentences')",
                    f"{len(doc.get('videos') or [])} video entries with categories but no 'sentences': the captions are missing",
                    CAPTIONS_HINT,
                )
            if isinstance(doc, dict) and "videos" in doc:
                rows, rejects = _official(doc, path)
            elif isinstance(doc, list):
                rows, rejects = _flat(doc, path)
            else:
                found = f"a JSON object with keys {sorted(doc)[:8]!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
                raise SourceFormatError(path, "the MSR-VTT videodatainfo object or the flat caption list", found, CAPTIONS_HINT)
            ing.count_in(len(rows) + len(rejects))
            kept = []
            for r in rows:
                if local is not None:
                    name = f"{r['video_id']}.mp4"
                    if name not in local:
                        rejects.append((r["_loc"], "media_file_missing", json.dumps(r["_raw"])))
                        continue
                    r["path"] = f"{videos_dir.rstrip('/')}/{name}"
                    r["url"] = None
                kept.append(r)
                split_counts[r["split"] or "unknown"] += 1
                captions_total += len(r["captions"])
            if kept:
                ing.add(_table(kept, path))
            if rejects:
                locs, reasons, raws = zip(*rejects)
                ing.quarantine(
                    quarantine_table(
                        DATASET, path, list(reasons), locators=list(locs), details=reason_details(reasons),
                        raws=[x.encode() for x in raws],
                    )
                )
        ing.extra.update({"videos_by_split": dict(split_counts), "captions": captions_total})
        return ing.commit()


def _official(doc: dict, path: str) -> tuple[list[dict], list[tuple[str, str, str]]]:
    rejects: list[tuple[str, str, str]] = []
    videos: dict[str, dict] = {}
    for i, v in enumerate(doc.get("videos") or []):
        vid = v.get("video_id") if isinstance(v, dict) else None
        if not isinstance(vid, str) or not vid:
            rejects.append((f"videos[{i}]", "missing_field", json.dumps(v)))
            continue
        if vid in videos:
            rejects.append((f"videos[{i}]", "duplicate_id", json.dumps(v)))
            continue
        start, end = _num(v.get("start time")), _num(v.get("end time"))
        if start is not None and end is not None and end <= start:
            rejects.append((f"videos[{i}]", "end_before_start", json.dumps(v)))
            continue
        videos[vid] = {
            "video_id": vid, "split": v.get("split"), "url": v.get("url"), "start": start, "end": end,
            "category": v.get("category"), "id": v.get("id"), "captions": [], "_loc": f"videos[{i}]", "_raw": v,
        }
    sentences = doc.get("sentences") or []
    for j in sorted(range(len(sentences)), key=lambda k: _sen_key(sentences[k])):
        s = sentences[j]
        if not isinstance(s, dict) or not isinstance(s.get("caption"), str) or not isinstance(s.get("video_id"), str):
            rejects.append((f"sentences[{j}]", "missing_field", json.dumps(s)))
            continue
        v = videos.get(s["video_id"])
        if v is None:
            rejects.append((f"sentences[{j}]", "caption_for_unknown_video", json.dumps(s)))
            continue
        v["captions"].append(s["caption"])
    rows = []
    for v in videos.values():
        if not v["captions"]:
            rejects.append((v["_loc"], "no_captions", json.dumps(v["_raw"])))
            continue
        rows.append(v)
    return rows, rejects


def _sen_key(s: Any) -> int:
    return s.get("sen_id", 0) if isinstance(s, dict) and isinstance(s.get("sen_id"), int) else 0


def _flat(doc: list, path: str) -> tuple[list[dict], list[tuple[str, str, str]]]:
    rejects: list[tuple[str, str, str]] = []
    videos: dict[str, dict] = {}
    for i, e in enumerate(doc):
        if not isinstance(e, dict) or not isinstance(e.get("video"), str) or not isinstance(e.get("caption"), str):
            rejects.append((f"[{i}]", "missing_field", json.dumps(e)))
            continue
        vid = e["video"].rsplit("/", 1)[-1].removesuffix(".mp4")
        v = videos.setdefault(
            vid,
            {"video_id": vid, "split": None, "url": None, "start": None, "end": None, "category": None, "id": None,
             "captions": [], "_loc": f"[{i}]", "_raw": e, "duration": _num(e.get("duration"))},
        )
        v["captions"].append(e["caption"])
    return list(videos.values()), rejects


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _table(rows: list[dict], path: str) -> pa.Table:
    durations = [
        r.get("duration") if r.get("duration") is not None else (r["end"] - r["start"] if r["start"] is not None and r["end"] is not None else None)
        for r in rows
    ]
    return base_table(
        {
            "sample_id": [f"msrvtt-{r['video_id']}" for r in rows],
            "dataset": [DATASET] * len(rows),
            "split": [r["split"] for r in rows],
            "media_kind": ["video"] * len(rows),
            "url": [r["url"] for r in rows],
            "path": [r.get("path") for r in rows],
            "captions": [r["captions"] for r in rows],
            "clip_start_s": [r["start"] if r.get("path") is None else None for r in rows],
            "clip_end_s": [r["end"] if r.get("path") is None else None for r in rows],
            "duration_s": durations,
            "source_file": [path] * len(rows),
            "source_line": pa.nulls(len(rows), pa.int64()),
        },
        extra={
            "src_video_id": pa.array([r["video_id"] for r in rows], pa.string()),
            "src_category": pa.array([r["category"] for r in rows], pa.int64()),
            "src_id": pa.array([r["id"] for r in rows], pa.int64()),
        },
    )
