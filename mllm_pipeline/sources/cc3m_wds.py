"""CC3M from already-downloaded webdataset shards (the pixparse/cc3m-wds layout).

That release holds ``cc3m-train-0000.tar`` ... ``cc3m-train-0575.tar`` (about 2.91M samples) and
``cc3m-validation-0000.tar`` ... (about 13.4k samples); each sample is consecutive tar members sharing a key:
``<key>.jpg``, ``<key>.txt`` (the caption) and usually ``<key>.json``. The images are already there, so this
source skips the download stage: each row's ``path`` is an fsspec URL of the image inside its tar
(``tar://<key>.jpg::<shard path>``), readable with ``fsspec.open``.

Only the tar headers and the small text members are read; the JPEG bytes are skipped, not decoded.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
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

DATASET = "cc3m"
SHARD_RE = re.compile(r"^cc3m-(train|validation)-(\d+)\.tar$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def list_shards(directory: str) -> list[str]:
    """The cc3m-{train,validation}-NNNN.tar files in ``directory``, in order."""
    fs, root = filesystem_for(directory)
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        raise SourceFormatError(directory, "a directory of cc3m-train-NNNN.tar / cc3m-validation-NNNN.tar shards", "no such directory") from None
    shards = [n for n in names if SHARD_RE.match(n)]
    examples = [n for n in names if n.endswith(".tar")] or names
    if not shards:
        raise SourceFormatError(
            directory,
            "webdataset shards named cc3m-train-NNNN.tar / cc3m-validation-NNNN.tar (the pixparse/cc3m-wds layout)",
            f"{len(names)} file(s), none named like that" + (f" (e.g. {examples[0]!r})" if names else ""),
        )
    return [f"{directory.rstrip('/')}/{n}" for n in shards]


#: The key :func:`_samples` yields when a tar ends in the middle (truncated download, disk full): one record.
TRUNCATED = "(truncated)"


def _samples(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (key, members) per sample; members maps extension to bytes (text) or size (images). A tar that breaks
    off yields its whole samples, then ``(TRUNCATED, {"error", "in_sample"})``: the sample it broke off in is lost
    with the rest of the tar, and the other tars are read as usual."""
    key, members = None, {}
    try:
        yield from _members(path, key, members)
    except (tarfile.TarError, EOFError, OSError) as e:
        yield TRUNCATED, {"error": f"{type(e).__name__}: {e}"}


def _members(path: str, key: str | None, members: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    with open_source(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            if "." not in name:
                continue
            k, ext = name.split(".", 1)
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            if ext.lower() in IMAGE_EXTS:
                members["image"] = name
                members["image_size"] = info.size
            elif ext in ("txt", "json"):
                members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def ingest_cc3m_wds(
    directory: str,
    storage: Storage,
    *,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    logger: Any = None,
    identity: Any = None,
    **raw_options: Any,
) -> IngestReport:
    """Index the CC3M webdataset shards in ``directory`` into raw shards under ``raw/cc3m_wds``."""
    with RawIngest(storage, DATASET, rows_per_shard=rows_per_shard, prefix="raw/cc3m_wds", logger=logger, identity=identity, **raw_options) as ing:
        seen: dict[str, set[str]] = {}  # split -> keys kept so far: a key names one sample id, once
        for shard in list_shards(directory):
            ing.begin_source(shard)
            split = SHARD_RE.match(shard.rsplit("/", 1)[-1]).group(1)
            rows: list[dict[str, Any]] = []
            bad: list[tuple[str, str, bytes]] = []
            kept_keys = seen.setdefault(split, set())
            for key, m in _samples(shard):
                reason, caption = None, None
                if key == TRUNCATED:
                    ing.log.warning(f"[{DATASET}] {shard} breaks off ({m['error']}): its samples up to there are read, "
                                    "the sample it broke off in is set aside with the rest of the tar (truncated_tar)")
                    bad.append((key, "truncated_tar", json.dumps(m).encode()))
                    continue
                if key in kept_keys:  # repeated in this tar or in an earlier one: its image is not what the id names
                    reason = "duplicate_id"
                elif "image" not in m:
                    reason = "missing_image"
                elif "txt" not in m:
                    reason = "missing_caption"
                else:
                    try:
                        caption = m["txt"].decode("utf-8").strip()
                        reason = None if caption else "missing_caption"
                    except UnicodeDecodeError:
                        reason = "invalid_utf8"
                if reason:
                    bad.append((key, reason, json.dumps({k: (v if isinstance(v, (int, str)) else v.decode("utf-8", "replace")) for k, v in m.items()}).encode()))
                    continue
                meta = _json(m.get("json"))
                kept_keys.add(key)
                rows.append(
                    {
                        "key": key,
                        "image": m["image"],
                        "caption": caption,
                        "url": meta.get("url"),
                        "width": meta.get("width"),
                        "height": meta.get("height"),
                    }
                )
            ing.count_in(len(rows) + len(bad))
            if rows:
                n = len(rows)
                ing.add(
                    base_table(
                        {
                            "sample_id": [f"cc3m-wds-{split}-{r['key']}" for r in rows],
                            "dataset": [DATASET] * n,
                            "split": [split] * n,
                            "media_kind": ["image"] * n,
                            "url": [r["url"] for r in rows],
                            "path": [f"tar://{r['image']}::{shard}" for r in rows],
                            "captions": [[r["caption"]] for r in rows],
                            "source_file": [shard] * n,
                            "source_line": pa.nulls(n, pa.int64()),
                        },
                        extra={
                            "src_key": pa.array([r["key"] for r in rows], pa.string()),
                            "src_width": pa.array([_int(r["width"]) for r in rows], pa.int64()),
                            "src_height": pa.array([_int(r["height"]) for r in rows], pa.int64()),
                        },
                    )
                )
            if bad:
                keys, reasons, raws = zip(*bad)
                ing.quarantine(
                    quarantine_table(DATASET, shard, list(reasons), locators=[f"key {k}" for k in keys],
                                     details=reason_details(reasons), raws=list(raws))
                )
        return ing.commit()


def _json(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _int(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None
