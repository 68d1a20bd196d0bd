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
import os
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
    json_object,
    quarantine_table,
    raw_json,
    reason_details,
    repeated_keys,
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
#: A split named in a file name (``msrvtt_ret_train9k``, ``msrvtt_qa_val``, ``msrvtt_ret_test1k``).
NAME_SPLIT = re.compile(r"(?:^|[^a-z])(train|val|test)")
#: The retrieval caption files of the MMAction2 / VindLU folder, and the scheme each training file belongs to.
FOLDER_TRAIN = {"train9k": "9k-1kA", "train7k": "7k-1kA"}
MC_OVERLAP = ("training", "evaluation")
MC_EVAL_SET = "msrvtt_mc_test"
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


#: A JSON document is parsed whole, in memory: the most bytes one may hold (``$MLLM_MAX_JSON_BYTES``; default
#: 8 GiB, far above the real ones: COCO's captions_train2017.json is 92 MB, Karpathy's dataset_coco.json 150 MB).
DEFAULT_MAX_JSON_BYTES = 8 << 30


def load_json(path: str) -> Any:
    """A JSON document (MSR-VTT, COCO, evaluation sets), with every object that names a key twice marked."""
    limit = int(os.environ.get("MLLM_MAX_JSON_BYTES") or DEFAULT_MAX_JSON_BYTES)
    with open_source(path, max_bytes=limit) as f:
        raw = f.read()
    try:
        doc = json.loads(raw, object_pairs_hook=json_object)
    except UnicodeDecodeError as e:
        raise SourceFormatError(path, "a UTF-8 JSON document", f"bytes that are not UTF-8 at offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise SourceFormatError(path, "a JSON document", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if repeated_keys(doc):
        raise SourceFormatError(path, "a JSON document whose top-level keys each appear once",
                                f"the key(s) {repeated_keys(doc)} more than once (the later value would silently "
                                "replace the earlier one)")
    return doc


def _local_names(videos_dir: str | None) -> set[str] | None:
    if not videos_dir:
        return None
    fs, root = filesystem_for(videos_dir)
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        raise SourceFormatError(videos_dir, "a directory of MSR-VTT videos (video0.mp4 ...)", "no such directory") from None


def file_kind(doc: Any) -> str:
    """What an MSR-VTT JSON file is, by its fields: ``annotation`` (the official videodatainfo object), ``captions``
    (the flat / MMAction2 retrieval list of ``{video, caption}``), ``qa`` (``{question, answer, ...}``), ``mc``
    (the multiple-choice test, ``{video, caption: [options], answer: index}``), ``answer_list`` (the QA answer
    vocabulary: a list of strings), or ``unknown``."""
    if isinstance(doc, dict):
        return "annotation" if "videos" in doc else "unknown"
    if not isinstance(doc, list):
        return "unknown"
    if doc and all(isinstance(e, str) for e in doc[:1000]):
        return "answer_list"
    first = next((e for e in doc if isinstance(e, dict)), None)
    if first is None:
        return "captions" if not doc else "unknown"
    if "question" in first:
        return "qa"
    if isinstance(first.get("caption"), list) and "answer" in first:
        return "mc"
    return "captions"


def name_split(path: str, file_splits: dict[str, str] | None = None) -> str | None:
    """A file's split: ``file_splits[<file name>]`` when configured, else the ``train`` / ``val`` / ``test`` its
    name holds (``msrvtt_ret_train9k.json`` -> train), else None."""
    name = path.rsplit("/", 1)[-1]
    if file_splits and name in file_splits:
        return file_splits[name]
    m = NAME_SPLIT.search(name.lower())
    return m.group(1) if m else None


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".", 1)[0]


def folder_train_files(paths: list[str]) -> dict[str, str]:
    """The MMAction2 / VindLU training caption files among ``paths``: path -> the scheme it belongs to."""
    out = {}
    for p in paths:
        name = p.rsplit("/", 1)[-1].lower()
        for tag, scheme in FOLDER_TRAIN.items():
            if tag in name and "qa" not in name:
                out[p] = scheme
    return out


def ingest_msrvtt(
    paths: list[str],
    storage: Storage,
    *,
    videos_dir: str | None = None,
    split_scheme: str = "official",
    train_list: str | None = None,
    test_list: str | None = None,
    qa_paths: list[str] | None = None,
    file_splits: dict[str, str] | None = None,
    mc_overlap: str = "training",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    logger: Any = None,
    identity: Any = None,
    **raw_options: Any,
) -> IngestReport:
    """Read MSR-VTT annotation file(s), the split lists of ``split_scheme`` and MSRVTT-QA, and commit one raw row
    per video under ``raw/msrvtt`` (see the module doc for the layouts and rules)."""
    check_scheme(split_scheme, train_list, test_list, paths)
    if mc_overlap not in MC_OVERLAP:
        raise ValueError(f"mc_overlap must be one of {', '.join(MC_OVERLAP)}, not {mc_overlap!r}")
    local = _local_names(videos_dir)
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, logger=logger, identity=identity, **raw_options) as ing:
        videos: dict[str, dict] = {}  # video_id -> row, over all annotation files, in reading order
        category_only: list[str] = []
        set_aside: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # annotation path -> its rejects
        kinds: dict[str, str] = {}
        skipped: list[dict[str, Any]] = []
        qa_docs: list[tuple[str, Any]] = []
        mc_docs: list[tuple[str, Any]] = []
        other_scheme = {p for p, sch in folder_train_files(paths).items() if split_scheme != "official" and sch != split_scheme}

        def reject(r: dict, reason: str) -> None:
            set_aside[r["_path"]].append((r["_loc"], reason, raw_json(r["_raw"])))

        for path in paths:
            doc = load_json(path)
            kind = file_kind(doc)
            if path in other_scheme:
                skipped.append({"file": path, "why": f"the training captions of the other scheme ({split_scheme} chosen)"})
                ing.log.info(f"[{DATASET}] skipping {path}: {skipped[-1]['why']}")
                continue
            if kind == "answer_list":
                skipped.append({"file": path, "why": f"the MSRVTT-QA answer vocabulary ({len(doc):,} answers), not samples"})
                ing.log.info(f"[{DATASET}] skipping {path}: {skipped[-1]['why']}")
                continue
            if kind == "qa":
                qa_docs.append((path, doc))
                continue
            if kind == "mc":
                mc_docs.append((path, doc))
                continue
            ing.begin_source(path)
            kinds[path] = kind
            no_sentences = kind == "annotation" and "sentences" not in doc
            if no_sentences and split_scheme == "official":
                raise SourceFormatError(
                    path,
                    "MSR-VTT annotations with captions ('sentences')",
                    f"{len(doc.get('videos') or [])} video entries with categories but no 'sentences': the captions are missing",
                    CAPTIONS_HINT,
                )
            if kind == "annotation":
                for key in ("videos", "sentences"):
                    if key in doc and not isinstance(doc[key], list):
                        raise SourceFormatError(path, f"the MSR-VTT videodatainfo object, whose '{key}' is a list",
                                                f"'{key}' holding a JSON {type(doc[key]).__name__}", CAPTIONS_HINT)
                rows, rejects = _official(doc, path)
                if no_sentences:
                    category_only.append(path)
            elif kind == "captions":
                rows, rejects = _flat(doc, path)
                split = name_split(path, file_splits)
                for r in rows:
                    r["split"] = split
                    if split in ("test", "val"):
                        r["eval_set"] = _stem(path)
                        if split == "test" and r.pop("_single", False):  # the 1k-A protocol: one sentence a video
                            r["eval_caption"] = r["captions"][0]
            else:
                found = f"a JSON object with keys {sorted(doc)[:8]!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
                raise SourceFormatError(path, "the MSR-VTT videodatainfo object, a caption list [{video, caption}], an "
                                        "MSRVTT-QA list, the multiple-choice test or the QA answer list", found, CAPTIONS_HINT)
            ing.count_in(len(rows) + len(rejects))
            for r in rows:
                r["_path"], r["qa"] = path, []
                r.setdefault("eval_caption", None)
                earlier = videos.get(r["video_id"])
                if earlier is not None:  # the same video in an earlier file: captions first, then evaluation files
                    keep_new = _rank(r) > _rank(earlier)
                    why = "in_test_file" if _is_eval(r) != _is_eval(earlier) else "duplicate_id"
                    if not keep_new:
                        rejects.append((r["_loc"], why, raw_json(r["_raw"])))
                        continue
                    reject(earlier, why)
                videos[r["video_id"]] = r
            _quarantine_json(ing, path, rejects)

        extra: dict[str, Any] = {"split_scheme": split_scheme}
        if train_list or test_list:
            _apply_scheme(ing, videos, split_scheme, train_list, test_list, extra)
        if mc_docs:
            _attach_mc(ing, videos, mc_docs, mc_overlap, extra, kinds)
        if train_list or test_list:
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
        qa_docs += [(p, load_json(p)) for p in (qa_paths or [])]
        if qa_docs:
            _attach_qa(ing, videos, qa_docs, extra, file_splits, kinds)
        split_counts: Counter[str] = Counter()
        captions_total = 0
        kept_by_path: dict[str, list[dict]] = defaultdict(list)
        for r in videos.values():
            if r.get("_gone"):
                continue
            if not r["captions"] and not r["qa"] and r.get("mc") is None:
                reject(r, "train_captions_missing" if r["_path"] in category_only else "no_captions")
                continue
            kept_by_path[r["_path"]].append(r)
            split_counts[r["split"] or "unknown"] += 1
            captions_total += len(r["captions"])
        for path in kinds:
            if kept_by_path.get(path):
                ing.add(_table(kept_by_path[path], path))
            _quarantine_json(ing, path, set_aside.get(path, []))
        n_missing = sum(1 for rs in set_aside.values() for _, why, _ in rs if why == "train_captions_missing")
        if n_missing:
            extra["note"] = TRAIN_CAPTIONS_NOTE.format(files=", ".join(category_only), n_test=extra.get("eval_captions", 0),
                                                       n_train=n_missing, scheme=split_scheme)
            ing.log.warning(f"[{DATASET}] {extra['note']}")
        evaluation = Counter(r.get("eval_set") for r in videos.values() if not r.get("_gone") and r.get("eval_set"))
        extra.update({"videos_by_split": dict(split_counts), "captions": captions_total, "file_kinds": kinds,
                      "videos_by_eval_set": dict(evaluation)})
        if skipped:
            extra["skipped_files"] = skipped
        ing.extra.update(extra)
        return ing.commit()


def _is_eval(r: dict) -> bool:
    return r.get("split") in ("test", "val", "validate")


def _rank(r: dict) -> tuple[bool, bool]:
    """Which of two rows of one video wins: the one with captions, then the one from an evaluation file."""
    return (bool(r["captions"]), _is_eval(r))


def check_scheme(split_scheme: str, train_list: str | None, test_list: str | None, paths: list[str] | None = None) -> None:
    """The scheme is known and has exactly the split lists it needs (an error that says what to set, not a guess).
    With the MMAction2 / VindLU folder (``msrvtt_ret_train9k.json`` ...) the scheme picks its training file and
    needs no split lists; both training files under ``official`` is ambiguous."""
    if split_scheme not in SPLIT_SCHEMES:
        raise ValueError(f"split_scheme must be one of {', '.join(SPLIT_SCHEMES)}, not {split_scheme!r}")
    folder = folder_train_files(paths or [])
    if len(set(folder.values())) > 1 and split_scheme == "official":
        raise ValueError(f"paths hold both training caption files ({', '.join(sorted(folder))}); the 7k list is part of "
                         "the 9k one: set split_scheme to 9k-1kA or 7k-1kA to choose one, or name only one of them")
    if folder and not (train_list or test_list):
        if split_scheme != "official" and split_scheme not in folder.values():
            raise ValueError(f"split_scheme {split_scheme!r} needs its training caption file, but paths hold only "
                             f"{', '.join(sorted(folder))}")
        return
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
                    r["split"], r["eval_caption"], r["eval_set"] = "test", sentence, _stem(path)
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


def qa_split(path: str, file_splits: dict[str, str] | None = None) -> str:
    """The split of an MSRVTT-QA file, from its name (``train_qa.json`` / ``msrvtt_qa_train.json`` -> train,
    ``val`` -> val, ``test`` -> test) unless ``file_splits`` names it."""
    split = name_split(path, file_splits)
    if split is None:
        raise SourceFormatError(path, "an MSRVTT-QA file whose name holds its split (train_qa.json, msrvtt_qa_val.json, "
                                "...) or a file_splits entry for it", f"the name {path.rsplit('/', 1)[-1]!r}")
    return split


def qa_video(e: dict) -> str | None:
    """The video an MSRVTT-QA entry names: ``video_id: N`` (the original release) or ``video: "videoN.mp4"``
    (the MMAction2 / VindLU files)."""
    vid = e.get("video_id")
    if isinstance(vid, int) and not isinstance(vid, bool):
        return f"video{vid}"
    if isinstance(e.get("video"), str) and e["video"].strip():
        return e["video"].rsplit("/", 1)[-1].removesuffix(".mp4")
    return None


def qa_answers(e: dict) -> list[str] | None:
    """The answers of an entry: a string, or a list of strings (MMAction2's QA files), stripped; None if invalid."""
    a = e.get("answer")
    answers = [a] if isinstance(a, str) else a if isinstance(a, list) else None
    if not answers or not all(isinstance(x, str) and x.strip() for x in answers):
        return None
    return [x.strip() for x in answers]


def _attach_qa(ing: RawIngest, videos: dict[str, dict], qa_docs: list[tuple[str, Any]], extra: dict[str, Any],
               file_splits: dict[str, str] | None, kinds: dict[str, str]) -> None:
    """Put each question on its video's row (``qa``); set aside malformed ones and those naming an unknown or a
    set-aside video. A list of answers keeps them all; the most frequent (the first among equals) trains."""
    by_split: dict[str, dict[str, int]] = {}
    on_train = 0
    for path, doc in qa_docs:
        split = qa_split(path, file_splits)
        ing.begin_source(path)
        kinds[path] = "qa"
        if not isinstance(doc, list):
            found = f"a JSON object with keys {sorted(doc)[:8]!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
            raise SourceFormatError(path, "the MSRVTT-QA list [{question, answer, video_id | video, ...}]", found)
        rejects: list[tuple[str, str, str]] = []
        kept = 0
        for i, e in enumerate(doc):
            if repeated_keys(e):
                rejects.append((f"[{i}]", "repeated_key", raw_json(e)))
                continue
            answers = qa_answers(e) if isinstance(e, dict) else None
            vid = qa_video(e) if isinstance(e, dict) else None
            if not (answers and vid and isinstance(e.get("question"), str) and e["question"].strip()):
                rejects.append((f"[{i}]", "missing_field", raw_json(e)))
                continue
            v = videos.get(vid)
            if v is None:
                rejects.append((f"[{i}]", "qa_for_unknown_video", raw_json(e)))
                continue
            if v.get("_gone"):
                rejects.append((f"[{i}]", "qa_for_set_aside_video", raw_json(e)))
                continue
            qid = next((e[k] for k in ("id", "question_id") if isinstance(e.get(k), int) and not isinstance(e.get(k), bool)), i)
            v["qa"].append({"question": e["question"].strip(), "answer": Counter(answers).most_common(1)[0][0],
                            "split": split, "id": qid,
                            "category_id": e["category_id"] if isinstance(e.get("category_id"), int) else None,
                            "answers": answers if isinstance(e.get("answer"), list) else None})
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


def _attach_mc(ing: RawIngest, videos: dict[str, dict], mc_docs: list[tuple[str, Any]], overlap_policy: str,
               extra: dict[str, Any], kinds: dict[str, str]) -> None:
    """The multiple-choice test (``msrvtt_mc_test.json``: the 2,990 official test videos, five caption options
    each, ``answer`` the index of the right one). Each entry rides on its video's row (``src_mc_options``,
    ``src_mc_answer``); a video no caption file names becomes an evaluation row of its own (split ``test``,
    ``eval_set`` msrvtt_mc_test, no captions). Under 9k-1kA, 1,990 of its videos are training videos by the
    scheme's design: ``overlap_policy`` ``training`` keeps them training (counted as overlapping), ``evaluation``
    moves them to the test split."""
    for path, doc in mc_docs:
        ing.begin_source(path)
        kinds[path] = "mc"
        rejects: list[tuple[str, str, str]] = []
        counts = Counter()
        for i, e in enumerate(doc):
            if repeated_keys(e):
                rejects.append((f"[{i}]", "repeated_key", raw_json(e)))
                continue
            opts = e.get("caption") if isinstance(e, dict) else None
            ok = (isinstance(e, dict) and isinstance(e.get("video"), str) and e["video"].strip() and isinstance(opts, list)
                  and opts and all(isinstance(c, str) for c in opts))
            if not ok:
                rejects.append((f"[{i}]", "missing_field", raw_json(e)))
                continue
            ans = e.get("answer")
            if not (isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(opts)):
                rejects.append((f"[{i}]", "bad_answer", raw_json(e)))
                continue
            vid = e["video"].rsplit("/", 1)[-1].removesuffix(".mp4")
            v = videos.get(vid)
            if v is None:
                v = videos[vid] = {"video_id": vid, "split": "test", "url": None, "start": None, "end": None, "category": None,
                                   "id": None, "captions": [], "_loc": f"[{i}]", "_raw": e, "_path": path, "qa": [],
                                   "eval_caption": None, "eval_set": MC_EVAL_SET}
                ing.count_in(1)  # a row of its own
                counts["videos_only_here"] += 1
            elif v.get("_gone"):
                rejects.append((f"[{i}]", "mc_for_set_aside_video", raw_json(e)))
                continue
            elif v.get("mc") is not None:
                rejects.append((f"[{i}]", "duplicate_id", raw_json(e)))
                continue
            elif v["split"] is None and v.get("eval_set") is None:  # outside the scheme's lists: an evaluation video
                v["split"], v["eval_set"] = "test", MC_EVAL_SET
            elif not _is_eval(v):
                counts["videos_overlapping_training"] += 1
                if overlap_policy == "evaluation":
                    v["split"], v["eval_set"] = "test", MC_EVAL_SET
            v["mc"] = {"options": [c.strip() for c in opts], "answer": ans}
            counts["entries_kept"] += 1
        ing.count_in(len(rejects))
        _quarantine_json(ing, path, rejects)
        extra["mc_test"] = {"file": path, "entries": len(doc), "set_aside": len(rejects), "overlap_policy": overlap_policy,
                            **{k: counts[k] for k in ("entries_kept", "videos_only_here", "videos_overlapping_training")}}
        if counts["videos_overlapping_training"]:
            kept = "kept as training" if overlap_policy == "training" else "moved to the test split"
            ing.log.info(f"[{DATASET}] {counts['videos_overlapping_training']:,} video(s) of {path} are training videos "
                         f"of the scheme: {kept} (mc_overlap: {overlap_policy})")


def _official(doc: dict, path: str) -> tuple[list[dict], list[tuple[str, str, str]]]:
    rejects: list[tuple[str, str, str]] = []
    videos: dict[str, dict] = {}
    for i, v in enumerate(doc.get("videos") or []):
        if repeated_keys(v):
            rejects.append((f"videos[{i}]", "repeated_key", raw_json(v)))
            continue
        vid = v.get("video_id") if isinstance(v, dict) else None
        if not isinstance(vid, str) or not vid:
            rejects.append((f"videos[{i}]", "missing_field", raw_json(v)))
            continue
        if vid in videos:
            rejects.append((f"videos[{i}]", "duplicate_id", raw_json(v)))
            continue
        start, end = _num(v.get("start time")), _num(v.get("end time"))
        if start is not None and end is not None and end <= start:
            rejects.append((f"videos[{i}]", "end_before_start", raw_json(v)))
            continue
        videos[vid] = {
            "video_id": vid, "split": v.get("split"), "url": v.get("url"), "start": start, "end": end,
            "category": v.get("category"), "id": v.get("id"), "captions": [], "_loc": f"videos[{i}]", "_raw": v,
        }
    sentences = doc.get("sentences") or []
    for j in sorted(range(len(sentences)), key=lambda k: _sen_key(sentences[k])):
        s = sentences[j]
        if repeated_keys(s):
            rejects.append((f"sentences[{j}]", "repeated_key", raw_json(s)))
            continue
        if not isinstance(s, dict) or not isinstance(s.get("caption"), str) or not isinstance(s.get("video_id"), str):
            rejects.append((f"sentences[{j}]", "missing_field", raw_json(s)))
            continue
        v = videos.get(s["video_id"])
        if v is None:
            rejects.append((f"sentences[{j}]", "caption_for_unknown_video", raw_json(s)))
            continue
        v["captions"].append(s["caption"])
    return list(videos.values()), rejects  # videos without captions: the caller decides (they may have questions)


def _sen_key(s: Any) -> int:
    return s.get("sen_id", 0) if isinstance(s, dict) and isinstance(s.get("sen_id"), int) else 0


def _flat(doc: list, path: str) -> tuple[list[dict], list[tuple[str, str, str]]]:
    rejects: list[tuple[str, str, str]] = []
    videos: dict[str, dict] = {}
    for i, e in enumerate(doc):
        if repeated_keys(e):
            rejects.append((f"[{i}]", "repeated_key", raw_json(e)))
            continue
        caps = flat_captions(e)
        if caps is None:
            rejects.append((f"[{i}]", "missing_field", raw_json(e)))
            continue
        vid = e["video"].rsplit("/", 1)[-1].removesuffix(".mp4")
        v = videos.get(vid)
        if v is None:
            v = videos[vid] = {"video_id": vid, "split": None, "url": None, "start": None, "end": None, "category": None,
                               "id": None, "captions": [], "_loc": f"[{i}]", "_raw": e, "duration": _num(e.get("duration")),
                               "_single": isinstance(e["caption"], str)}
        else:
            v["_single"] = False
        v["captions"].extend(caps)
    return list(videos.values()), rejects


def flat_captions(e: Any) -> list[str] | None:
    """The captions of a caption-list entry (``caption`` a string, or a list of strings as in MMAction2's
    ``msrvtt_ret_test1k.json``); None when the entry lacks ``video`` or a valid ``caption``."""
    if not isinstance(e, dict) or repeated_keys(e) or not isinstance(e.get("video"), str) or not e["video"].strip():
        return None
    c = e.get("caption")
    if isinstance(c, str):
        return [c]
    if isinstance(c, list) and c and all(isinstance(x, str) for x in c):
        return list(c)
    return None


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
            "eval_set": pa.array([r.get("eval_set") for r in rows], pa.string()),
            "qa": pa.array([r.get("qa") or None for r in rows], QA_TYPE),
        },
        extra={
            "src_video_id": pa.array([r["video_id"] for r in rows], pa.string()),
            "src_category": pa.array([r["category"] for r in rows], pa.int64()),
            "src_id": pa.array([r["id"] for r in rows], pa.int64()),
            "src_mc_options": pa.array([(r.get("mc") or {}).get("options") for r in rows], pa.list_(pa.string())),
            "src_mc_answer": pa.array([(r.get("mc") or {}).get("answer") for r in rows], pa.int64()),
        },
    )
