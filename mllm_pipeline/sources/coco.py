"""COCO captions (``captions_train2017.json``, ``captions_val2017.json``, or 2014's ``captions_train2014.json``,
``captions_val2014.json``).

The file holds ``images`` (``id``, ``file_name``, ``coco_url``, ``width``, ``height``, ...) and ``annotations``
(``image_id``, ``id``, ``caption``), about 5 captions an image. They are joined into one row per image with all
its captions (ordered by annotation id), so a download stage fetches each image once. A caption whose
``image_id`` is not among the images is quarantined as ``image_missing`` and counted; an image without any
caption is quarantined as ``no_captions``.

With ``images_dir`` (the folder holding ``train2017/`` and ``val2017/``, or ``train2014/`` and ``val2014/``: the
year is read from the caption file's name) rows point at the local files instead of ``coco_url``; images absent
there are quarantined as ``media_file_missing``.

Train and val are disjoint by definition, and image ids are the same in 2014 and 2017: an image that a second file
names again (train2014 with train2017, say) is set aside as ``duplicate_id`` with its captions, so one id never
has two splits. Evaluation files are read first, so the evaluation split keeps a shared image.

COCO captioning is usually evaluated on Karpathy's split (5,000 test images of val2014, most of them in
train2017): declare it with ``eval_sets`` (:mod:`mllm_pipeline.sources.eval_sets`).
"""

from __future__ import annotations

import re
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
    raw_json,
    reason_details,
    repeated_keys,
)
from mllm_pipeline.sources.msrvtt import load_json
from mllm_pipeline.storage import Storage, filesystem_for

DATASET = "coco"


def split_of(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    for split in ("train", "val", "test"):
        if split in name:
            return split
    return "train"


def image_folder(path: str) -> str:
    """The image folder of a caption file: ``captions_val2014.json`` -> ``val2014``; 2017 when the name has no
    year (``captions_train2017.json`` -> ``train2017``)."""
    m = re.search(r"(19|20)\d\d", path.rsplit("/", 1)[-1])
    return f"{split_of(path)}{m.group(0) if m else '2017'}"


def _listing(images_dir: str, sub: str) -> set[str]:
    fs, root = filesystem_for(images_dir)
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root.rstrip('/')}/{sub}", detail=False)}
    except FileNotFoundError:
        return set()


def ingest_coco(
    paths: list[str],
    storage: Storage,
    *,
    images_dir: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    logger: Any = None,
    identity: Any = None,
    **raw_options: Any,
) -> IngestReport:
    """Read COCO caption file(s) and commit one raw row per image under ``raw/coco``."""
    counts = defaultdict(int)
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, logger=logger, identity=identity, **raw_options) as ing:
        seen: set[int] = set()  # image ids kept from earlier files: train and val are disjoint by definition
        # evaluation files first: when files share an image, the evaluation split keeps it and training gives way
        for path in sorted(paths, key=lambda p: split_of(p) == "train"):
            ing.begin_source(path)
            doc = load_json(path)
            if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
                found = f"a JSON object with keys {sorted(doc)[:8]!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
                raise SourceFormatError(path, "a COCO captions file with 'images' and 'annotations' lists", found)
            split = split_of(path)
            sub = image_folder(path)
            local = _listing(images_dir, sub) if images_dir else None
            rejects: list[tuple[str, str, str]] = []
            images: dict[int, dict] = {}
            for i, im in enumerate(doc["images"]):
                if repeated_keys(im):
                    rejects.append((f"images[{i}]", "repeated_key", raw_json(im)))
                elif not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
                    rejects.append((f"images[{i}]", "missing_field", raw_json(im)))
                elif im["id"] in images:
                    rejects.append((f"images[{i}]", "duplicate_id", raw_json(im)))
                else:
                    images[im["id"]] = {**im, "_loc": f"images[{i}]", "_caps": []}
            anns = doc["annotations"]
            for j in sorted(range(len(anns)), key=lambda k: _ann_id(anns[k])):
                a = anns[j]
                if repeated_keys(a):
                    rejects.append((f"annotations[{j}]", "repeated_key", raw_json(a)))
                elif not isinstance(a, dict) or not isinstance(a.get("caption"), str) or not isinstance(a.get("image_id"), int):
                    rejects.append((f"annotations[{j}]", "missing_field", raw_json(a)))
                elif a["image_id"] not in images:
                    rejects.append((f"annotations[{j}]", "image_missing", raw_json(a)))
                    counts["captions_image_missing"] += 1
                else:
                    images[a["image_id"]]["_caps"].append(a["caption"].strip())
            rows = []
            for im in images.values():
                raw = raw_json({k: v for k, v in im.items() if not k.startswith("_")})
                if im["id"] in seen:
                    rejects.append((im["_loc"], "duplicate_id", raw))
                    counts["images_in_an_earlier_file"] += 1
                elif not im["_caps"]:
                    rejects.append((im["_loc"], "no_captions", raw))
                elif local is not None and im["file_name"] not in local:
                    rejects.append((im["_loc"], "media_file_missing", raw))
                else:
                    rows.append(im)
                    seen.add(im["id"])
                    counts["captions"] += len(im["_caps"])
            counts[f"images_{split}"] += len(rows)
            # records: every image, plus every caption that could not be attached to one
            ing.count_in(len(doc["images"]) + sum(1 for r in rejects if r[0].startswith("annotations")))
            if rows:
                ing.add(_table(rows, path, split, images_dir, sub))
            if rejects:
                locs, reasons, raws = zip(*rejects)
                ing.quarantine(
                    quarantine_table(DATASET, path, list(reasons), locators=list(locs), details=reason_details(reasons),
                                     raws=[x.encode() for x in raws])
                )
        ing.extra.update(dict(counts))
        return ing.commit()


def _ann_id(a: Any) -> int:
    return a.get("id", 0) if isinstance(a, dict) and isinstance(a.get("id"), int) else 0


def _table(rows: list[dict], path: str, split: str, images_dir: str | None, sub: str) -> pa.Table:
    n = len(rows)
    return base_table(
        {
            "sample_id": [f"coco-{r['id']}" for r in rows],
            "dataset": [DATASET] * n,
            "split": [split] * n,
            "media_kind": ["image"] * n,
            "url": [r.get("coco_url") if not images_dir else None for r in rows],
            "path": [f"{images_dir.rstrip('/')}/{sub}/{r['file_name']}" if images_dir else None for r in rows],
            "captions": [r["_caps"] for r in rows],
            "source_file": [path] * n,
            "source_line": pa.nulls(n, pa.int64()),
        },
        extra={
            "src_image_id": pa.array([r["id"] for r in rows], pa.int64()),
            "src_file_name": pa.array([r["file_name"] for r in rows], pa.string()),
            "src_coco_url": pa.array([r.get("coco_url") for r in rows], pa.string()),
            "src_flickr_url": pa.array([r.get("flickr_url") for r in rows], pa.string()),
            "src_width": pa.array([r.get("width") for r in rows], pa.int64()),
            "src_height": pa.array([r.get("height") for r in rows], pa.int64()),
            "src_license": pa.array([r.get("license") for r in rows], pa.int64()),
            "src_date_captured": pa.array([r.get("date_captured") for r in rows], pa.string()),
        },
    )
