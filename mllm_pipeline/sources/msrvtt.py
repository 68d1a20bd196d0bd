"""MSR-VTT as its users prepare it: the annotation, a split scheme (official / 9k-1kA / 7k-1kA) and MSRVTT-QA.

Annotation layouts accepted (``paths``):

* **Official** (``train_val_videodatainfo.json``, ``test_videodatainfo.json``, ``videodatainfo_2017.json``, and
  ``MSRVTT_data.json`` of the CLIP4Clip / EMCL bundle): ``{"info", "videos": [{"video_id", "category", "url",
  "start time", "end time", "split", "id"}], "sentences": [{"video_id", "caption", "sen_id"}]}``. 10,000 videos, 20
  captions each, split into train / validate / test of 6,513 / 497 / 2,990 videos (often misquoted as 6,153 and
  2,090).
* **Flat**: ``[{"video": "video9770.mp4", "caption": "...", "duration": 10.8}, ...]``, one entry per caption.
* **Category-only**: ``videos`` (with their categories) but no ``sentences``, as some retrieval releases ship.
  Under ``official`` it stops with a message saying where the captions are; under a 1k-A scheme the 1,000 JSFusion
  sentences are ingested and every training video is set aside as ``train_captions_missing`` (the 9k / 7k training
  captions are only in ``MSRVTT_data.json`` or the official files), and the report says so in ``note``.

Split schemes (``split_scheme``):

* ``official``: the annotation's own ``split`` (train / validate / test). No split lists.
* ``9k-1kA`` / ``7k-1kA``: the retrieval splits of JSFusion / CLIP4Clip. ``train_list`` is ``MSRVTT_train.9k.csv`` /
  ``MSRVTT_train.7k.csv`` (one column ``video_id``) and its videos get split ``train`` (the 9k list includes 1,990
  official test videos: under this scheme they are training data); ``test_list`` is ``MSRVTT_JSFUSION_test.csv``
  (columns ``,key,vid_key,video_id,sentence``) and its 1,000 videos get split ``test``, with the JSFusion sentence as
  the evaluation caption. A video in neither list is set aside as ``not_in_split_lists`` and counted
  (``videos_outside_scheme``), never trained on silently. A split-list line naming a video that is not in the
  annotation, a malformed line, a repeated id, or a train-list video that is also in the test list is set aside
  with its file, line and reason.

The evaluation caption: MSR-VTT 1k-A scores each test video against one sentence. It is recorded in the raw column
``eval_caption`` and also put first in ``captions`` (the sentence is one of the video's 20 official captions; it is
not repeated), so readers that take ``captions[0]`` get it and readers that ignore the column see the same captions
as before; every other row has ``eval_caption`` null.

MSRVTT-QA (``qa_paths``: ``train_qa.json``, ``val_qa.json``, ``test_qa.json``, lists of ``{"question", "answer",
"video_id": <N for videoN>, "id", "category_id"}``): the questions are carried on their video's row in the raw
column ``qa`` (``list<struct<question, answer, split, id, category_id>>``, split from the file name: ``train`` /
``val`` / ``test``), not as a raw dataset of their own. Why: the media stage is keyed by the raw shards, so QA on
the video's own row means each video is downloaded once for its captions and its questions, and its media digest
(:data:`~mllm_pipeline.sources.common.MEDIA_COLUMNS`) and caption digest do not change when questions are added, so
adding QA re-downloads and re-cleans nothing. The manifests turn each pair (or each video's pairs, as turns) into an
instruction sample whose split is the question's own split, so the QA test split is an evaluation split whatever the
video's retrieval split is. A question naming a video not in the annotation is set aside as
``qa_for_unknown_video``; one whose video was set aside (outside the scheme, media missing) as
``qa_for_set_aside_video``. A video with questions but no captions is kept (its questions are still instruction
data).

One row per video (so a video is fetched once). With ``videos_dir`` the media are the local
``<videos_dir>/<video_id>.mp4`` files; otherwise the YouTube URL with the clip's start and end times.

Row accounting: a record that is merged into a video's row (a caption, a split-list line, a question) is part of
that row; one that is set aside is a record of its own in the quarantine, so ``rows_in == rows_kept +
rows_quarantined`` still holds, and ``split_lists`` / ``qa_by_split`` report how many of each were read and used.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa

from mllm_pipeline.sources.common import (
    DEFAULT_ROWS_PER_SHARD,
    QA_TYPE,
    IngestReport,
    RawIngest,
    SourceFormatError,
    base_table,
    quarantine_table,
    reason_details,
)
from mllm_pipeline.storage import Storage, filesystem_for, open_source

DATASET = "msrvtt"
#: Bump when a rule that shapes the rows changes (see :mod:`mllm_pipeline.stages.raw`).
PARSER_VERSION = "2"
SPLIT_SCHEMES = ("official", "9k-1kA", "7k-1kA")
#: How many videos each list of the bundle holds (for the report; fixtures and subsets may hold fewer).
BUNDLE_LIST_SIZES = {"9k-1kA": 9000, "7k-1kA": 7010, "test": 1000}
QA_FILE_SPLITS = {"train_qa": "train", "val_qa": "val", "test_qa": "test"}
VIDEO_ID = re.compile(r"video\d+")
OFFICIAL_SPLIT_SIZES = {"train": 6513, "validate": 497, "test": 2990}
CAPTIONS_HINT = (
    "The captions are in the official MSR-VTT annotation 'train_val_videodatainfo.json' / 'test_videodatainfo.json' "
    "(also shipped as 'MSRVTT_data.json' with the CLIP4Clip data), whose top level has 'info', 'videos' and "
    "'sentences'; or give the flat [{video, caption, duration}] list. With split_scheme 9k-1kA or 7k-1kA and the "
    "JSFusion test list, a category-only file gives the 1,000 test sentences (the training captions still need "
    "MSRVTT_data.json or the official files)."
)
TRAIN_CAPTIONS_NOTE = (
    "The annotation has no sentences ({files}): only the {n_test} JSFusion test sentences were ingested, and the "
    "{n_train} training videos of the {scheme} list were set aside as train_captions_missing. The 9k / 7k training "
    "captions are in MSRVTT_data.json (CLIP4Clip / EMCL bundle) or the official train_val_videodatainfo.json / "
    "test_videodatainfo.json: add one of them to paths."
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
    split_scheme: str = "official",
    train_list: str | None = None,
    test_list: str | None = None,
    qa_paths: list[str] | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    logger: Any = None,
    identity: Any = None,
) -> IngestReport:
    """Read MSR-VTT annotation file(s), the split lists of ``split_scheme`` and MSRVTT-QA, and commit one raw row
    per video under ``raw/msrvtt`` (see the module doc for the layouts and rules)."""
    check_scheme(split_scheme, train_list, test_list)
    local = _local_names(videos_dir)
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, logger=logger, identity=identity) as ing:
        videos: dict[str, dict] = {}  # video_id -> row, over all annotation files, in reading order
        category_only: list[str] = []
        set_aside: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # annotation path -> its rejects

        def reject(r: dict, reason: str) -> None:
            set_aside[r["_path"]].append((r["_loc"], reason, json.dumps(r["_raw"])))

        for path in paths:
            ing.begin_source(path)
            doc = load_json(path)
            no_sentences = isinstance(doc, dict) and "videos" in doc and "sentences" not in doc
            if no_sentences and split_scheme == "official":
                raise SourceFormatError(
                    path,
                    "MSR-VTT annotations with captions ('sentences')",
                    f"{len(doc.get('videos') or [])} video entries with categories but no 'sentences': the captions are missing",
                    CAPTIONS_HINT,
                )
            if isinstance(doc, dict) and "videos" in doc:
                rows, rejects = _official(doc, path)
                if no_sentences:
                    category_only.append(path)
            elif isinstance(doc, list):
                rows, rejects = _flat(doc, path)
            else:
                found = f"a JSON object with keys {sorted(doc)[:8]!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
                raise SourceFormatError(path, "the MSR-VTT videodatainfo object or the flat caption list", found, CAPTIONS_HINT)
            ing.count_in(len(rows) + len(rejects))
            for r in rows:
                r["_path"], r["eval_caption"], r["qa"] = path, None, []
                earlier = videos.get(r["video_id"])
                if earlier is not None:  # the same video in an earlier file: the first with captions wins
                    if earlier["captions"] or not r["captions"]:
                        rejects.append((r["_loc"], "duplicate_id", json.dumps(r["_raw"])))
                        continue
                    reject(earlier, "duplicate_id")  # a category-only entry, given its captions by a later file
                videos[r["video_id"]] = r
            _quarantine_json(ing, path, rejects)

        extra: dict[str, Any] = {"split_scheme": split_scheme}
        if split_scheme != "official":
            _apply_scheme(ing, videos, split_scheme, train_list, test_list, extra)
            outside = [r for r in videos.values() if r["split"] is None]
            for r in outside:
                reject(r, "not_in_split_lists")
                r["_gone"] = True
            extra["videos_outside_scheme"] = len(outside)
        if local is not None:
            for r in videos.values():
                if r.get("_gone"):
                    continue
                name = f"{r['video_id']}.mp4"
                if name not in local:
                    reject(r, "media_file_missing")
                    r["_gone"] = True
                    continue
                r["path"] = f"{videos_dir.rstrip('/')}/{name}"
                r["url"] = None
        if qa_paths:
            _attach_qa(ing, videos, qa_paths, extra)
        split_counts: Counter[str] = Counter()
        captions_total = 0
        kept_by_path: dict[str, list[dict]] = defaultdict(list)
        for r in videos.values():
            if r.get("_gone"):
                continue
            if not r["captions"] and not r["qa"]:
                reject(r, "train_captions_missing" if r["_path"] in category_only else "no_captions")
                continue
            kept_by_path[r["_path"]].append(r)
            split_counts[r["split"] or "unknown"] += 1
            captions_total += len(r["captions"])
        for path in paths:
            if kept_by_path.get(path):
                ing.add(_table(kept_by_path[path], path))
            _quarantine_json(ing, path, set_aside.get(path, []))
        n_missing = sum(1 for rs in set_aside.values() for _, why, _ in rs if why == "train_captions_missing")
        if n_missing:
            extra["note"] = TRAIN_CAPTIONS_NOTE.format(files=", ".join(category_only), n_test=extra.get("eval_captions", 0),
                                                       n_train=n_missing, scheme=split_scheme)
            ing.log.warning(f"[{DATASET}] {extra['note']}")
        extra.update({"videos_by_split": dict(split_counts), "captions": captions_total})
        ing.extra.update(extra)
        return ing.commit()


def check_scheme(split_scheme: str, train_list: str | None, test_list: str | None) -> None:
    """The scheme is known and has exactly the split lists it needs (an error that says what to set, not a guess)."""
    if split_scheme not in SPLIT_SCHEMES:
        raise ValueError(f"split_scheme must be one of {', '.join(SPLIT_SCHEMES)}, not {split_scheme!r}")
    if split_scheme == "official":
        if train_list or test_list:
            raise ValueError("train_list / test_list are the split lists of the 9k-1kA and 7k-1kA schemes; with "
                             "split_scheme 'official' the annotation's own splits are used: remove them or set "
                             "split_scheme")
        return
    missing = [n for n, v in (("train_list", train_list), ("test_list", test_list)) if not v]
    if missing:
        k = split_scheme.split("-")[0]
        raise ValueError(f"split_scheme {split_scheme!r} needs {' and '.join(missing)}: train_list is "
                         f"MSRVTT_train.{k}.csv and test_list MSRVTT_JSFUSION_test.csv")
    other = "7k" if split_scheme.startswith("9k") else "9k"
    if other in train_list.rsplit("/", 1)[-1]:
        raise ValueError(f"train_list {train_list} looks like the {other} list, but split_scheme is {split_scheme!r}")


def _quarantine_json(ing: RawIngest, path: str, rejects: list[tuple[str, str, str]]) -> None:
    if rejects:
        locs, reasons, raws = zip(*rejects)
        ing.quarantine(quarantine_table(DATASET, path, list(reasons), locators=list(locs),
                                        details=reason_details(reasons), raws=[x.encode() for x in raws]))


def _csv_lines(path: str, required: tuple[str, ...], what: str) -> tuple[dict[str, int], list[tuple[int, list[str] | None, str, bytes]]]:
    """(column -> index from the header, [(line number, fields or None, reason if bad, raw bytes)]) of a small CSV;
    line numbers are physical lines, 1 being the header."""
    with open_source(path) as f:
        data = f.read()
    lines = data.splitlines()
    if not lines:
        raise SourceFormatError(path, f"{what} with a header line naming {', '.join(required)}", "an empty file")
    try:
        header = next(csv.reader([lines[0].decode("utf-8-sig")]))
    except UnicodeDecodeError:
        raise SourceFormatError(path, f"a UTF-8 CSV ({what})", "a header line that is not UTF-8") from None
    cols = {name.strip(): i for i, name in enumerate(header)}
    if any(c not in cols for c in required):
        raise SourceFormatError(path, f"{what} with a header line naming {', '.join(required)}",
                                f"the header {header!r}")
    out: list[tuple[int, list[str] | None, str, bytes]] = []
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            if n == len(lines):  # a blank last line is only the file's end
                continue
            out.append((n, None, "empty_line", raw))
            continue
        try:
            fields = next(csv.reader([raw.decode("utf-8")]))
        except UnicodeDecodeError:
            out.append((n, None, "invalid_utf8", raw))
            continue
        except csv.Error:
            out.append((n, None, "wrong_field_count", raw))
            continue
        if len(fields) != len(header):
            out.append((n, None, "wrong_field_count", raw))
            continue
        out.append((n, fields, "", raw))
    return cols, out


def _apply_scheme(ing: RawIngest, videos: dict[str, dict], scheme: str, train_list: str, test_list: str,
                  extra: dict[str, Any]) -> None:
    """Give every video in the lists its split (and the 1k-A test videos their evaluation caption); set the bad
    lines of the lists aside. Videos in no list keep split None (the caller sets them aside)."""
    for r in videos.values():
        r["split"] = None
    test: dict[str, str] = {}
    stats: dict[str, Any] = {}
    for path, role in ((test_list, "test"), (train_list, "train")):
        ing.begin_source(path)
        required = ("video_id", "sentence") if role == "test" else ("video_id",)
        cols, lines = _csv_lines(path, required, "the JSFusion 1k-A test list" if role == "test" else f"the {scheme} train list")
        bad: list[tuple[int, str, bytes]] = []
        seen: set[str] = set()
        used = 0
        for n, fields, reason, raw in lines:
            if fields is None:
                bad.append((n, reason, raw))
                continue
            vid = fields[cols["video_id"]].strip()
            if not VIDEO_ID.fullmatch(vid):
                bad.append((n, "bad_id", raw))
            elif vid in seen:
                bad.append((n, "duplicate_id", raw))
            elif vid not in videos:
                bad.append((n, "unknown_video", raw))
            elif role == "test" and not fields[cols["sentence"]].strip():
                bad.append((n, "missing_caption", raw))
            elif role == "train" and vid in test:
                bad.append((n, "in_test_list", raw))
            else:
                seen.add(vid)
                used += 1
                r = videos[vid]
                if role == "test":
                    sentence = fields[cols["sentence"]].strip()
                    test[vid] = sentence
                    r["split"], r["eval_caption"] = "test", sentence
                    r["captions"] = [sentence] + [c for c in r["captions"] if c.strip() != sentence]
                else:
                    r["split"] = "train"
        ing.count_in(len(bad))
        if bad:
            nums, reasons, raws = zip(*bad)
            ing.quarantine(quarantine_table(DATASET, path, list(reasons), lines=list(nums),
                                            details=reason_details(reasons), raws=list(raws)))
        stats[role] = {"file": path, "lines": len(lines), "videos": used, "set_aside": len(bad),
                       "bundle_size": BUNDLE_LIST_SIZES["test" if role == "test" else scheme]}
    extra["split_lists"] = stats
    extra["eval_captions"] = len(test)


def qa_split(path: str) -> str:
    """The split of an MSRVTT-QA file, from its name (``train_qa.json`` -> train, ``val_qa`` -> val, ``test_qa``)."""
    name = path.rsplit("/", 1)[-1].lower()
    for stem, split in QA_FILE_SPLITS.items():
        if name.startswith(stem):
            return split
    raise SourceFormatError(path, "an MSRVTT-QA file named train_qa.json, val_qa.json or test_qa.json (its split)",
                            f"the name {name!r}")


def _attach_qa(ing: RawIngest, videos: dict[str, dict], qa_paths: list[str], extra: dict[str, Any]) -> None:
    """Put each question on its video's row (``qa``); set aside malformed ones and those naming an unknown or a
    set-aside video."""
    by_split: dict[str, dict[str, int]] = {}
    on_train = 0
    for path in qa_paths:
        split = qa_split(path)
        ing.begin_source(path)
        doc = load_json(path)
        if not isinstance(doc, list):
            found = f"a JSON object with keys {sorted(doc)[:8]!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
            raise SourceFormatError(path, "the MSRVTT-QA list [{question, answer, video_id, id, category_id}]", found)
        rejects: list[tuple[str, str, str]] = []
        kept = 0
        for i, e in enumerate(doc):
            ok = (isinstance(e, dict) and isinstance(e.get("question"), str) and e["question"].strip()
                  and isinstance(e.get("answer"), str) and e["answer"].strip()
                  and isinstance(e.get("video_id"), int) and not isinstance(e.get("video_id"), bool))
            if not ok:
                rejects.append((f"[{i}]", "missing_field", json.dumps(e)))
                continue
            v = videos.get(f"video{e['video_id']}")
            if v is None:
                rejects.append((f"[{i}]", "qa_for_unknown_video", json.dumps(e)))
                continue
            if v.get("_gone"):
                rejects.append((f"[{i}]", "qa_for_set_aside_video", json.dumps(e)))
                continue
            v["qa"].append({"question": e["question"].strip(), "answer": e["answer"].strip(), "split": split,
                            "id": e["id"] if isinstance(e.get("id"), int) else i,
                            "category_id": e["category_id"] if isinstance(e.get("category_id"), int) else None})
            kept += 1
            if split != "train" and v["split"] == "train":
                on_train += 1
        ing.count_in(len(rejects))
        _quarantine_json(ing, path, rejects)
        s = by_split.setdefault(split, {"questions": 0, "set_aside": 0})
        s["questions"] += kept
        s["set_aside"] += len(rejects)
    extra["qa_by_split"] = by_split
    # 9k-1kA trains on 1,990 official test videos whose questions are MSRVTT-QA test questions: say how many
    extra["qa_eval_questions_on_train_videos"] = on_train

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
    return list(videos.values()), rejects  # videos without captions: the caller decides (they may have questions)


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
            "eval_caption": pa.array([r.get("eval_caption") for r in rows], pa.string()),
            "qa": pa.array([r.get("qa") or None for r in rows], QA_TYPE),
        },
        extra={
            "src_video_id": pa.array([r["video_id"] for r in rows], pa.string()),
            "src_category": pa.array([r["category"] for r in rows], pa.int64()),
            "src_id": pa.array([r["id"] for r in rows], pa.int64()),
        },
    )
