"""Declared evaluation sets: media that an evaluation uses, named by a file that is not a training file.

A raw asset's ``eval_sets`` config lists such files. Every raw row whose medium one of them names becomes an
evaluation sample of that set, whatever split its training file gave it: its ``split`` is the set's split
(``test`` or ``val``, both evaluation splits by default) and its ``eval_set`` column the set's name. From there
the evaluation protection that already holds for evaluation splits applies: the row is kept whole (never
filtered, never de-duplicated away), no training caption may copy its captions, and no training sample in any
dataset may carry a byte or perceptual copy of its medium (``captions_dedup`` with ``media_hashes``). The
manifests count each set's samples in and out (``eval_sets`` in their metadata).

Files recognised (by their content, not their name):

* **Karpathy's split of COCO**, ``dataset_coco.json``: ``{"images": [{"filepath": "val2014", "filename":
  "COCO_val2014_000000391895.jpg", "cocoid": 391895, "split": "test" | "val" | "train" | "restval",
  "sentences": [...]}], "dataset": "coco"}``. Gives two sets, ``karpathy_test`` (5,000 images) and
  ``karpathy_val`` (5,000); ``train`` and ``restval`` images are training images and are not a set.
* **The per-split Karpathy lists** many trainers read (BLIP / LAVIS ``coco_karpathy_test.json``,
  ``coco_karpathy_val.json``): ``[{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [...]}]``. The
  set is named after the file (``coco_karpathy_test``), its split read from the name (``val`` -> val, else test).
* **A retrieval or caption list** (``msrvtt_ret_test1k.json`` and the like): ``[{"video": "video7020.mp4", ...}]``
  or ``[{"image": ...}]``.
* **Any list of ids or file names**: a JSON list of strings or numbers, or a text file with one per line
  (blank lines and lines starting with ``#`` ignored).

Matching. An entry names a medium by an id or a file name; both sides are reduced to a key: the file name
without folders and extension, and a COCO file name (``COCO_val2014_000000391895``, ``000000391895``) or a
number to the image id without leading zeros (``391895``). A raw row's keys are its sample id without the
dataset prefix (``coco-391895`` -> ``391895``, ``msrvtt-video7020`` -> ``video7020``) and the file name of its
``path`` or ``url``. Matching is within the dataset whose raw asset declares the set, so a number in one
dataset's list never matches another dataset's rows. Image ids are the same in COCO 2014 and 2017, so the
Karpathy files (named after val2014) match ``captions_train2017.json`` / ``captions_val2017.json`` rows as
well as 2014's.

A declared set that matches no row of the dataset stops the ingest (a protection that cannot work is an error,
not a warning); one that matches some of its entries is reported with its count of entries not found.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.sources.msrvtt import DEFAULT_MAX_JSON_BYTES
from mllm_pipeline.storage import open_source

_COCO_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d{4}_)?0*(\d+)$")


def media_key(name: Any) -> str:
    """The key a file name or id is matched by (see the module doc)."""
    s = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    s = s.split("?", 1)[0]
    if "." in s and not s.replace(".", "").isdigit():
        s = s.rsplit(".", 1)[0]
    m = _COCO_NAME.match(s)
    return str(int(m.group(1))) if m else s


@dataclass
class EvalSet:
    name: str
    split: str
    source: str
    keys: set[str]
    entries: int
    found: set[str] = field(default_factory=set)

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "file": self.source, "entries": self.entries,
                "distinct_media": len(self.keys), "found": len(self.found),
                "not_found": len(self.keys) - len(self.found)}


def _split_from_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    return "val" if re.search(r"(^|[^a-z])val", name) else "test"


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".", 1)[0]


def load_eval_sets(paths: list[str]) -> list[EvalSet]:
    """Read each declared evaluation-set file (see the module doc for the layouts)."""
    out: list[EvalSet] = []
    for path in paths:
        with open_source(path, max_bytes=int(os.environ.get("MLLM_MAX_JSON_BYTES") or DEFAULT_MAX_JSON_BYTES)) as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SourceFormatError(path, "a UTF-8 evaluation-set file", f"bytes that are not UTF-8 at offset {e.start}") from None
        doc: Any
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("images"), list) and any(
                isinstance(im, dict) and "split" in im for im in doc["images"][:100]):
            by_split: dict[str, list[str]] = {"test": [], "val": []}
            for im in doc["images"]:
                if not isinstance(im, dict) or im.get("split") not in by_split:
                    continue
                ident = im.get("cocoid", im.get("filename"))
                if ident is not None:
                    by_split[im["split"]].append(media_key(ident))
            for split, keys in by_split.items():
                if keys:
                    out.append(EvalSet(f"karpathy_{split}", split, path, set(keys), len(keys)))
            continue
        if isinstance(doc, list):
            keys = []
            for i, e in enumerate(doc):
                if isinstance(e, (str, int)) and not isinstance(e, bool):
                    keys.append(media_key(e))
                elif isinstance(e, dict) and isinstance(e.get("image") or e.get("video"), str):
                    keys.append(media_key(e.get("image") or e.get("video")))
                else:
                    raise SourceFormatError(path, "an evaluation-set list: ids, file names, or entries with 'image' or "
                                            "'video'", f"entry [{i}]: {json.dumps(e)[:200]}")
        elif doc is not None:
            found = f"a JSON object with keys {sorted(doc)[:8]!r}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
            raise SourceFormatError(path, "Karpathy's dataset_coco.json, a list of entries with 'image' / 'video', or a "
                                    "list of ids or file names", found)
        else:
            keys = [media_key(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise SourceFormatError(path, "an evaluation-set file naming at least one medium", "no entries")
        out.append(EvalSet(_stem(path), _split_from_name(path), path, set(keys), len(keys)))
    names = Counter(s.name for s in out)
    if any(n > 1 for n in names.values()):
        raise SourceFormatError(", ".join(paths), "evaluation sets with distinct names (from their file names)",
                                f"the name(s) {sorted(k for k, n in names.items() if n > 1)} more than once")
    return out


def row_keys(dataset: str, table: pa.Table) -> list[list[str]]:
    """Each row's match keys: its sample id without the ``<dataset>-`` prefix, and its medium's file name."""
    prefix = f"{dataset}-"
    ids = table["sample_id"].to_pylist()
    paths = table["path"].to_pylist() if "path" in table.column_names else [None] * len(ids)
    urls = table["url"].to_pylist() if "url" in table.column_names else [None] * len(ids)
    out = []
    for sid, p, u in zip(ids, paths, urls):
        keys = [media_key(sid[len(prefix):] if sid.startswith(prefix) else sid)]
        for m in (p, u):
            if m:
                keys.append(media_key(m.split("::", 1)[0].removeprefix("tar://") if m.startswith("tar://") else m))
        out.append(keys)
    return out


def mark(dataset: str, table: pa.Table, sets: list[EvalSet]) -> pa.Table:
    """``table`` with the rows that a declared set names moved to that set's split and ``eval_set`` (the first set
    that names a row wins); records what each set found."""
    if not sets or table.num_rows == 0:
        return table
    split = table["split"].cast(pa.string()).to_pylist()
    eval_set = table["eval_set"].to_pylist() if "eval_set" in table.column_names else [None] * table.num_rows
    changed = False
    for r, keys in enumerate(row_keys(dataset, table)):
        for s in sets:
            hit = next((k for k in keys if k in s.keys), None)
            if hit is not None:
                s.found.add(hit)
                split[r], eval_set[r] = s.split, s.name
                changed = True
                break
    if not changed:
        return table
    i = table.column_names.index("split")
    table = table.set_column(i, table.schema.field(i), pa.array(split, pa.string()).dictionary_encode().cast(table.schema.field(i).type))
    j = table.column_names.index("eval_set")
    return table.set_column(j, table.schema.field(j), pa.array(eval_set, pa.string()))


def check_found(dataset: str, sets: list[EvalSet]) -> None:
    """A declared set that named no row of the dataset is an error: its protection cannot work."""
    for s in sets:
        if not s.found:
            raise SourceFormatError(
                s.source, f"an evaluation set whose media are rows of {dataset}",
                f"none of its {len(s.keys):,} media ({', '.join(sorted(s.keys)[:3])}, ...) is a {dataset} row",
                f"Check that the file belongs to {dataset} (declare it on that dataset's raw asset) and that the "
                "annotation files holding its media are in 'paths' (COCO's Karpathy split: captions_train2017.json "
                "and captions_val2017.json, or 2014's). Nothing was committed.")
