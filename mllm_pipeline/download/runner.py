"""One media shard, end to end: decide what to fetch, fetch it, account for every row, write, commit.

The fetcher (images: :mod:`mllm_pipeline.download.images`, videos: :mod:`mllm_pipeline.download.videos`) gets
the rows to fetch and yields one :class:`Fetched` per row. This module does the rest, the same way for both:

* **skip**: a shard's identity is the digest of the rows it is fetched from (the raw shard's ``media`` digest:
  sample ids, URLs, paths, clip times), the content options and :data:`CODE_VERSION`. A shard already committed
  with that identity is not fetched again, whatever happened to the rest of the raw data (a re-ingest of unchanged
  files, a row edited in another shard, a crash halfway through a range);
* **retry only the failed**: with ``retry_failed``, only the rows that failed last time are fetched; earlier
  successes are copied from the previous version and the two are merged by row, so no sample is duplicated or
  lost;
* **crash safety**: everything goes into a new version directory; the shard becomes visible only when its
  manifest is written, after the tar and the status table are complete. A killed run leaves an uncommitted
  directory that nothing reads. Earlier versions are never deleted here (manifests and checkpoints may still read
  them): retention removes them when nothing kept reads them any more.
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
from mllm_pipeline.storage import Storage, identity_digest


def raw_uri_prefix(raw_uri: str) -> str:
    """``raw/<dataset>`` from a raw shard's URI (``<root>/raw/<dataset>/<version>/shard-NNNNN.parquet``)."""
    parts = raw_uri.rstrip("/").split("/")
    return "/".join(parts[-4:-2])

log_default = logging.getLogger(__name__)

#: Bump when a change here or in the fetchers changes what a media shard holds for the same rows and options.
CODE_VERSION = "media-3"  # media-3: opted_out, dns_error, tls_error, sign_in_required, video_unavailable


def shard_identity(rows_digest: str, options: dict[str, Any]) -> dict[str, Any]:
    """What a media shard is made from: the rows it fetches (by content), the content options, the code version."""
    return {"stage": "media", "code": CODE_VERSION, "rows": rows_digest, "options": options}


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
    rows_digest: str | None = None,
) -> ShardOutcome:
    """Fetch (or skip) one media shard. ``rows_digest`` is the raw shard's ``media`` digest from its manifest;
    without it, it is computed from the raw shard itself (the same value)."""
    log = log or log_default
    t0 = time.monotonic()
    rows: pa.Table | None = None
    if rows_digest is None:
        from mllm_pipeline.sources.common import MEDIA_COLUMNS
        from mllm_pipeline.sources.common import rows_digest as digest_of

        rows = read_raw_rows(raw_uri)
        rows_digest = digest_of(rows, MEDIA_COLUMNS)
    prefix = media_prefix(dataset, shard_key)
    identity = shard_identity(rows_digest, options)

    def outcome(skipped: bool, why: str, manifest: dict[str, Any], fetched: int) -> ShardOutcome:
        return ShardOutcome(shard_key, skipped, why, manifest["summary"], fetched, manifest["location"],
                            time.monotonic() - t0, manifest)

    done = None if force else storage.up_to_date(prefix, identity)  # (an undone change makes it current again)
    if done is not None and not retry_failed:
        log.info(f"[{dataset} {shard_key}] up to date: {done['version']} was fetched from these rows with these "
                 "options; not fetched again")
        return outcome(True, "up to date", done, 0)
    prev = Previous.load(storage, prefix)
    same = prev is not None and prev.manifest.get("identity_digest") == identity_digest(identity)

    if rows is None:
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

    inputs = [{"prefix": raw_uri_prefix(raw_uri), "version": raw_version}]
    with storage.new_version(prefix, identity, inputs=inputs, fresh=force or keep is not None) as version:
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
            "raw_uri": raw_uri, "raw_version": raw_version, "rows_digest": rows_digest, "options": options,
            "options_digest": options_digest(options), "summary": summary, "tar_bytes": writer.bytes,
        })
    s = summary
    log.info(
        f"[{dataset} {shard_key}] committed: {s['succeeded']}/{s['attempted']} succeeded "
        f"({100 * s['success_rate']:.1f}%), failed by reason {s['failed_by_reason'] or '{}'}, "
        f"in {time.monotonic() - t0:.1f}s"
    )
    return outcome(False, why, manifest, len(todo))


@dataclasses.dataclass
class ShardJob:
    """One shard of a range: the keyword arguments of :func:`materialize_shard` other than storage, fetch, log."""

    shard_key: str
    kwargs: dict[str, Any]


class _Prefixed:
    """A logger whose messages start with ``[<shard>]`` (shards fetched in parallel interleave in the run's log)."""

    def __init__(self, log: Any, prefix: str):
        self._log, self._prefix = log, prefix

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._log, name)
        if name in ("debug", "info", "warning", "error", "exception", "critical"):
            return lambda msg, *a, **kw: method(f"{self._prefix}{msg}", *a, **kw)
        return method


def materialize_range(
    storage: Storage,
    jobs: list[ShardJob],
    fetch: Fetcher,
    *,
    parallel_shards: int = 1,
    log: Any = None,
) -> Iterator[ShardOutcome]:
    """Materialize the shards of a range, ``parallel_shards`` at a time; yields each :class:`ShardOutcome` as its
    shard commits (in completion order), in the caller's thread, so the caller reports progress per shard.

    Parallelism is across shards: each shard is still one :func:`materialize_shard` (its own downloader call, its
    own version directory, its own commit), so what a shard holds and its identity do not depend on it. The fetcher
    must be safe to call from several threads at once; for images that means one shared guard proxy, which is what
    keeps per-host politeness global across the shards in flight. A shard that fails does not stop the others
    already running; the first failure is raised once they have finished, and shards not yet started are not
    started (a re-run skips the committed ones)."""
    import itertools
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    log = log or log_default
    n = max(1, min(parallel_shards, len(jobs)))

    def one(job: ShardJob) -> ShardOutcome:
        fetch_logged = fetch if n == 1 else (lambda rows, lg: fetch(rows, _Prefixed(lg, f"[{job.shard_key}] ")))
        return materialize_shard(storage, fetch=fetch_logged, log=log, **job.kwargs)

    if n == 1:
        for job in jobs:
            yield one(job)
        return
    pending = iter(jobs)
    error: BaseException | None = None
    with ThreadPoolExecutor(n, thread_name_prefix="media-shard") as pool:
        running = {pool.submit(one, job) for job in itertools.islice(pending, n)}
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    outcome = fut.result()
                except BaseException as e:  # noqa: BLE001 - re-raised after the running shards finish
                    error = error or e
                    continue
                yield outcome
            if error is None:
                for job in pending:
                    running.add(pool.submit(one, job))
                    if len(running) >= n:
                        break
    if error is not None:
        raise error
