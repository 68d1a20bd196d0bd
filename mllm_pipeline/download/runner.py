"""One media shard, end to end: decide what to fetch, fetch it, account for every row, write, commit.

The fetcher (images: :mod:`mllm_pipeline.download.images`, videos: :mod:`mllm_pipeline.download.videos`) gets
the rows to fetch and yields one :class:`Fetched` per row. This module does the rest, the same way for both:

* **skip**: a shard already committed for the same raw version and the same options is not fetched again
  (this is what makes a re-run after a crash cheap: finished shards stay finished);
* **retry only the failed**: with ``retry_failed``, only the rows that failed last time are fetched; earlier
  successes are copied from the previous version and the two are merged by row, so no sample is duplicated or
  lost;
* **crash safety**: everything goes into a new version directory; the shard becomes visible only when its
  manifest is written, after the tar and the status table are complete. A killed run leaves an uncommitted
  directory that nothing reads and the next commit removes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.download.accounting import FAILED, SUCCESS
from mllm_pipeline.download.shards import (
    MediaShardWriter,
    Previous,
    media_prefix,
    options_digest,
    read_raw_rows,
    sample_key,
    status_rows,
)
from mllm_pipeline.storage import Storage

log_default = logging.getLogger(__name__)


@dataclasses.dataclass
class Fetched:
    """The outcome for one raw row. ``media`` is ``(extension, bytes)`` on success."""

    row: int
    ok: bool
    reason: str | None = None
    detail: str | None = None
    media: tuple[str, bytes] | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


#: fetch(rows to fetch, scratch logger) -> one Fetched per row, in any order
Fetcher = Callable[[list[dict[str, Any]], Any], Iterator[Fetched]]


@dataclasses.dataclass
class ShardOutcome:
    shard_key: str
    skipped: bool
    reason: str  # why it was (not) fetched
    summary: dict[str, Any]
    fetched_rows: int
    location: str
    seconds: float
    manifest: dict[str, Any]


def materialize_shard(
    storage: Storage,
    *,
    dataset: str,
    shard_key: str,
    shard_index: int,
    raw_uri: str,
    raw_version: str,
    options: dict[str, Any],
    fetch: Fetcher,
    log: Any = None,
    retry_failed: bool = False,
    force: bool = False,
) -> ShardOutcome:
    log = log or log_default
    t0 = time.monotonic()
    prefix = media_prefix(dataset, shard_key)
    digest = options_digest(options)
    prev = Previous.load(storage, prefix)
    same = prev is not None and prev.manifest.get("raw_version") == raw_version and prev.manifest.get("options_digest") == digest

    def outcome(skipped: bool, why: str, manifest: dict[str, Any], fetched: int) -> ShardOutcome:
        return ShardOutcome(shard_key, skipped, why, manifest["summary"], fetched, manifest["location"],
                            time.monotonic() - t0, manifest)

    if same and not force and not retry_failed:
        log.info(f"[{dataset} {shard_key}] already committed for this raw version and these options: not fetched again")
        return outcome(True, "up to date", prev.manifest, 0)

    rows = read_raw_rows(raw_uri)
    keep: pa.Table | None = None
    if same and retry_failed and not force:
        failed_rows = set(pc.filter(prev.status["row"], pc.equal(prev.status["status"], FAILED)).to_pylist())
        if not failed_rows:
            log.info(f"[{dataset} {shard_key}] nothing failed last time: nothing to retry")
            return outcome(True, "nothing to retry", prev.manifest, 0)
        keep = prev.status.filter(pc.equal(prev.status["status"], SUCCESS))
        todo = [r for r in rows.to_pylist() if r["row"] in failed_rows]
        why = f"retrying {len(todo)} failed row(s)"
    else:
        todo = rows.to_pylist()
        why = "forced" if force else ("raw shard or options changed" if prev is not None else "new shard")
        if retry_failed and not same:
            why += " (retry_failed ignored: there is no committed result for this raw version and these options)"
    log.info(f"[{dataset} {shard_key}] {why}: fetching {len(todo)} of {rows.num_rows} row(s)")

    attempts_before: dict[int, int] = {}
    if prev is not None and same:
        attempts_before = dict(zip(prev.status["row"].to_pylist(), prev.status["attempts"].to_pylist()))
    by_row = {r["row"]: r for r in todo}

    with storage.new_version(prefix) as version:
        writer = MediaShardWriter(storage, version)
        status: list[dict[str, Any]] = []
        if keep is not None:
            writer.copy_from(storage, prev.tar_rel(), set(keep["key"].to_pylist()))
            status.extend(keep.to_pylist())
        done: set[int] = set()
        for f in fetch(todo, log):
            if f.row not in by_row or f.row in done:
                raise RuntimeError(f"fetcher returned row {f.row} {'twice' if f.row in done else 'which was not asked for'}")
            done.add(f.row)
            row = by_row[f.row]
            key = sample_key(shard_index, f.row)
            if f.ok:
                ext, data = f.media
                meta = {
                    "key": key, "sample_id": row["sample_id"], "dataset": dataset, "split": row.get("split"),
                    "captions": row["captions"], "url": row.get("url"), "path": row.get("path"),
                    "width": f.width, "height": f.height, "duration_s": f.duration_s,
                    "clip_start_s": row.get("clip_start_s"), "clip_end_s": row.get("clip_end_s"), **f.extra,
                }
                caption = (row["captions"] or [""])[0]
                writer.add(key, {ext: data, "txt": caption.encode(), "json": json.dumps(meta).encode()})
            status.append({
                "sample_id": row["sample_id"], "row": f.row, "key": key if f.ok else None, "ext": f.media[0] if f.ok else None,
                "status": SUCCESS if f.ok else FAILED, "reason": None if f.ok else (f.reason or "download_error"),
                "detail": f.detail, "width": f.width, "height": f.height, "duration_s": f.duration_s,
                "bytes": len(f.media[1]) if f.ok else None, "attempts": attempts_before.get(f.row, 0) + 1,
            })
        for r in todo:  # a fetcher that lost a row must not lose the sample: it is counted as failed
            if r["row"] not in done:
                status.append({"sample_id": r["sample_id"], "row": r["row"], "key": None, "status": FAILED,
                               "reason": "download_error", "detail": "the downloader returned no result for this row",
                               "width": None, "height": None, "duration_s": None, "bytes": None,
                               "attempts": attempts_before.get(r["row"], 0) + 1})
        table = status_rows(status)
        if table.num_rows != rows.num_rows or len(set(table["row"].to_pylist())) != rows.num_rows:
            raise RuntimeError(f"[{dataset} {shard_key}] {table.num_rows} status rows for {rows.num_rows} raw rows; nothing committed")
        summary = writer.close(table)
        manifest = version.commit({
            "dataset": dataset, "kind": "media_shard", "shard": shard_key, "shard_index": shard_index,
            "prefix": prefix, "raw_uri": raw_uri, "raw_version": raw_version, "options": options,
            "options_digest": digest, "summary": summary, "tar_bytes": writer.bytes,
        })
    s = summary
    log.info(
        f"[{dataset} {shard_key}] committed: {s['succeeded']}/{s['attempted']} succeeded "
        f"({100 * s['success_rate']:.1f}%), failed by reason {s['failed_by_reason'] or '{}'}, "
        f"in {time.monotonic() - t0:.1f}s"
    )
    return outcome(False, why, manifest, len(todo))
