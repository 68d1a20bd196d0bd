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

Layout (``<prefix>`` is ``media/<dataset>/<shard key>``)::

    <prefix>/_manifest.json              written last: the shard is trusted only once this exists
    <prefix>/<version>/media.tar          webdataset: <key>.<ext> (the media), <key>.txt (first caption),
                                          <key>.json (sample id, all captions, source, sizes, clip times)
    <prefix>/<version>/samples.parquet    one row per raw row: success, or failed with its reason

Keys are ``<shard number>_<row number>`` (``00003_00017``): built from positions, never from a URL or an id in the
annotation file, so no untrusted string reaches a file name, and a retried sample keeps its key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_pipeline.download.accounting import FAILED, STATUS_SCHEMA, SUCCESS, summarize
from mllm_pipeline.download.fetched import Fetcher
from mllm_pipeline.download.options import refetch_reasons
from mllm_pipeline.redact import redact_text, redacting
from mllm_pipeline.stages.registry import DATASETS
from mllm_pipeline.storage import Storage, Version, identity_digest

TAR_NAME = "media.tar"
STATUS_NAME = "samples.parquet"

RAW_COLUMNS = ["sample_id", "url", "path", "captions", "group_id", "clip_start_s", "clip_end_s", "duration_s", "split"]


def shard_key(index: int) -> str:
    """The key of raw shard ``index`` (also its Dagster partition key): ``shard-00000``, ``shard-00001`` ..."""
    return f"shard-{index:05d}"


def committed_shards(storage: Storage, dataset: str, what: str) -> list[str]:
    """Shard keys with a committed output under ``<what>/<dataset>/`` (any sharded stage: ``media``, ``captions``,
    ``curated/media_hashes`` ...), in shard order."""
    base = f"{what}/{dataset}"
    if not storage.exists(base):
        return []
    return sorted(k for k in storage.listdir(base) if k.startswith("shard-") and storage.exists(f"{base}/{k}/_manifest.json"))


def shard_index(key: str) -> int:
    if not key.startswith("shard-") or not key[6:].isdigit():
        raise ValueError(f"not a shard key: {key!r} (expected shard-NNNNN)")
    return int(key[6:])


def media_prefix(dataset: str, shard_key: str) -> str:
    return f"media/{dataset}/{shard_key}"


def sample_key(shard_index: int, row: int) -> str:
    return f"{shard_index:05d}_{row:05d}"


def options_digest(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_raw_rows(storage_or_uri: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of one raw shard (any fsspec URI), with a ``row`` column holding each row's position."""
    from mllm_pipeline.storage import filesystem_for

    fs, path = filesystem_for(storage_or_uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    cols = [c for c in (columns or RAW_COLUMNS) if c in table.column_names]
    table = table.select(cols)
    return table.append_column("row", pa.array(range(table.num_rows), pa.int32()))


@dataclasses.dataclass
class Previous:
    """The committed version of a media shard, if any."""

    manifest: dict[str, Any]
    status: pa.Table

    @classmethod
    def load(cls, storage: Storage, prefix: str) -> Previous | None:
        if not storage.exists(f"{prefix}/_manifest.json"):
            return None
        manifest = storage.read_manifest(prefix)
        with storage.open(f"{prefix}/{manifest['version']}/{STATUS_NAME}") as f:
            status = pq.read_table(f)
        return cls(manifest, status)

    def tar_rel(self) -> str:
        return f"{self.manifest['prefix']}/{self.manifest['version']}/{TAR_NAME}"


class HashingFile:
    """A file object that keeps the sha256 of every byte written to or read through it. ``drain`` reads what is
    left (a tar reader stops at the end-of-archive blocks, before the padding)."""

    def __init__(self, f: Any):
        self._f, self._h = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._h.update(data)
        return self._f.write(data)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._h.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def close(self) -> None:
        self._f.close()


class MediaShardWriter:
    """Streams ``media.tar`` into a new version; ``close`` writes the status table; the caller commits."""

    def __init__(self, storage: Storage, version: Version):
        self.storage = storage
        self.version = version
        self._raw = HashingFile(storage.open(version.rel(TAR_NAME), "wb"))
        self._tar = tarfile.open(fileobj=self._raw, mode="w|", format=tarfile.USTAR_FORMAT)
        self.keys: set[str] = set()
        self.bytes = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        if key in self.keys:
            raise RuntimeError(f"sample key {key} written twice into {self.version.rel(TAR_NAME)}")
        self.keys.add(key)
        now = int(time.time())
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)

    def copy_from(self, storage: Storage, tar_rel: str, keys: set[str]) -> int:
        """Copy the members of ``keys`` from an earlier version's tar (a retry keeps what already succeeded)."""
        copied: set[str] = set()
        with storage.open(tar_rel, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as src:
            for member in src:
                key = member.name.split(".", 1)[0]
                if key not in keys or not member.isfile():
                    continue
                data = src.extractfile(member).read()
                self._tar.addfile(member, io.BytesIO(data))
                self.bytes += len(data)
                copied.add(key)
        self.keys |= copied
        missing = keys - copied
        if missing:
            raise RuntimeError(f"{len(missing)} successful sample(s) are missing from {tar_rel}, e.g. {sorted(missing)[:3]}")
        return len(copied)

    @property
    def sha256(self) -> str:
        """The sha256 of ``media.tar`` as written (complete once :meth:`close` has run)."""
        return self._raw.hexdigest()

    def close(self, status: pa.Table) -> dict[str, Any]:
        self._tar.close()
        self._raw.close()
        status = status.cast(STATUS_SCHEMA).sort_by("row")
        ok = {k for k, s in zip(status.column("key").to_pylist(), status.column("status").to_pylist()) if s == SUCCESS}
        if ok != self.keys:
            raise RuntimeError(
                f"status table and tar disagree: {len(ok - self.keys)} success(es) without media, "
                f"{len(self.keys - ok)} stored sample(s) not marked successful"
            )
        with self.storage.open(self.version.rel(STATUS_NAME), "wb") as f:
            pq.write_table(status, f, compression="zstd")
        return summarize(status)


def iter_shard(storage: Storage, dataset: str, shard_key: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for every sample of a committed media shard, in tar order."""
    prefix = media_prefix(dataset, shard_key)
    manifest = storage.read_manifest(prefix)
    current: str | None = None
    files: dict[str, bytes] = {}
    with storage.open(f"{prefix}/{manifest['version']}/{TAR_NAME}", "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if current is not None and key != current:
                yield current, files
                files = {}
            current = key
            files[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, files


def read_status(storage: Storage, dataset: str, shard_key: str) -> pa.Table:
    prefix = media_prefix(dataset, shard_key)
    manifest = storage.read_manifest(prefix)
    with storage.open(f"{prefix}/{manifest['version']}/{STATUS_NAME}") as f:
        return pq.read_table(f)


def status_rows(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)


def media_index(storage: Storage, dataset: str, shard_key: str, manifest: dict[str, Any] | None = None) -> pa.Table:
    """The stored samples of a committed media shard (the current version, or the one ``manifest`` names):
    sample_id, media_tar (relative to the storage root), media_key, media_ext, width, height, duration_s."""
    prefix = media_prefix(dataset, shard_key)
    manifest = manifest or storage.read_manifest(prefix)
    with storage.open(f"{prefix}/{manifest['version']}/{STATUS_NAME}") as f:
        status = pq.read_table(f)
    ok = status.filter(pc.equal(status["status"], SUCCESS))
    ext = ok["ext"] if "ext" in ok.column_names else pa.nulls(ok.num_rows, pa.string())
    default_ext = "mp4" if DATASETS[dataset].video else manifest.get("options", {}).get("encode_format", "jpg")
    return pa.table({
        "sample_id": ok["sample_id"],
        "media_tar": pa.array([f"{prefix}/{manifest['version']}/{TAR_NAME}"] * ok.num_rows, pa.string()),
        "media_key": ok["key"],
        "media_ext": pc.fill_null(ext, default_ext),
        "width": ok["width"].cast(pa.int32()),
        "height": ok["height"].cast(pa.int32()),
        "duration_s": ok["duration_s"],
    })


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
class ShardOutcome:
    shard_key: str
    skipped: bool
    reason: str  # why it was (not) fetched
    summary: dict[str, Any]
    fetched_rows: int
    location: str
    seconds: float
    manifest: dict[str, Any]


def materialize_shard(storage: Storage, *, fetch: Fetcher, log: Any = None, **shard: Any) -> ShardOutcome:
    """Fetch (or skip) one media shard: :func:`plan_shard` with ``shard`` (its keyword arguments: ``dataset``,
    ``shard_key``, ``shard_index``, ``raw_uri``, ``raw_version``, ``options``, and optionally ``retry_failed``,
    ``force``, ``rows_digest``, ``fetch_options``), then :func:`write_shard` with ``fetch``."""
    plan = plan_shard(storage, log=log, **shard)
    return plan if isinstance(plan, ShardOutcome) else write_shard(storage, plan, fetch, log)


@dataclasses.dataclass
class ShardPlan:
    """What :func:`write_shard` will fetch for one shard, decided by :func:`plan_shard`. It holds the row numbers
    to fetch, not the rows (a range of hundreds of shards is planned before the first is written):
    :meth:`todo_rows` reads them from the raw shard when needed."""

    dataset: str
    shard_key: str
    shard_index: int
    raw_uri: str
    raw_version: str
    rows_digest: str
    options: dict[str, Any]
    fetch_options: dict[str, Any] | None
    identity: dict[str, Any]
    why: str
    todo: list[int]  # row numbers to fetch
    raw_rows: int
    prev: Previous | None
    keep: pa.Table | None  # status rows kept from the previous version (a retry)
    fresh: bool
    t0: float

    def todo_rows(self, rows: pa.Table | None = None) -> list[dict[str, Any]]:
        rows = rows if rows is not None else read_raw_rows(self.raw_uri)
        wanted = set(self.todo)
        return [r for r in rows.to_pylist() if r["row"] in wanted]


def plan_shard(
    storage: Storage,
    *,
    dataset: str,
    shard_key: str,
    shard_index: int,
    raw_uri: str,
    raw_version: str,
    options: dict[str, Any],
    log: Any = None,
    retry_failed: bool = False,
    force: bool = False,
    rows_digest: str | None = None,
    fetch_options: dict[str, Any] | None = None,
) -> ShardPlan | ShardOutcome:
    """Decide what one media shard needs: a :class:`ShardOutcome` when nothing (up to date, nothing to retry),
    else the :class:`ShardPlan` of what to fetch. ``rows_digest`` is the raw shard's ``media`` digest from its
    manifest; without it, it is computed from the raw shard itself (the same value). ``fetch_options``: the options
    that decide whether a URL can be fetched at all (``allow_loopback``, ``timeout_s`` ...), recorded with the
    shard; a committed shard whose failures one of them caused is not up to date once it changed: those rows (only
    those) are fetched again (:func:`mllm_pipeline.download.options.refetch_reasons`)."""
    log = redacting(log or log_default)  # no secret of a URL reaches the run's log
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
    redo: dict[str, list[str]] = {}  # failure reason -> the changed fetch options that caused it
    if done is not None and not retry_failed:
        redo = refetch_reasons(done.get("summary", {}).get("failed_by_reason") or {}, done.get("fetch_options"),
                               fetch_options)
        if not redo:
            log.info(f"[{dataset} {shard_key}] up to date: {done['version']} was fetched from these rows with these "
                     "options; not fetched again")
            return outcome(True, "up to date", done, 0)
    prev = Previous.load(storage, prefix)
    same = prev is not None and prev.manifest.get("identity_digest") == identity_digest(identity)

    if rows is None:
        rows = read_raw_rows(raw_uri, ["sample_id"])
    keep: pa.Table | None = None
    if same and (retry_failed or redo) and not force:
        failed = pc.equal(prev.status["status"], FAILED)
        if redo and not retry_failed:  # only the rows whose failure the changed options caused
            failed = pc.and_(failed, pc.is_in(prev.status["reason"], pa.array(sorted(redo), pa.string())))
        failed_rows = set(pc.filter(prev.status["row"], failed).to_pylist())
        if not failed_rows:
            log.info(f"[{dataset} {shard_key}] nothing failed last time: nothing to retry")
            return outcome(True, "nothing to retry", prev.manifest, 0)
        # kept as they are: the successes, and (re-fetching by options) the failures the options did not cause
        keep = prev.status.filter(pc.invert(pc.is_in(prev.status["row"], value_set=pa.array(sorted(failed_rows), pa.int32()))))
        todo = sorted(r for r in rows["row"].to_pylist() if r in failed_rows)
        why = f"retrying {len(todo)} failed row(s)" if retry_failed else (
            f"re-fetching {len(todo)} row(s) whose failure the fetch options caused ("
            + "; ".join(f"{reason}: {', '.join(opts)} changed" for reason, opts in sorted(redo.items())) + ")")
    else:
        todo = rows["row"].to_pylist()
        why = "forced" if force else ("raw shard or options changed" if prev is not None else "new shard")
        if retry_failed and not same:
            why += " (retry_failed ignored: there is no committed result for this raw version and these options)"
    log.info(f"[{dataset} {shard_key}] {why}: fetching {len(todo)} of {rows.num_rows} row(s)")
    return ShardPlan(dataset, shard_key, shard_index, raw_uri, raw_version, rows_digest, options, fetch_options,
                     identity, why, todo, rows.num_rows, prev if same else None, keep,
                     fresh=force or keep is not None, t0=t0)


def write_shard(storage: Storage, plan: ShardPlan, fetch: Fetcher, log: Any = None) -> ShardOutcome:
    """Fetch the rows of ``plan`` with ``fetch``, account for every row, write the new version and commit it."""
    log = redacting(log or log_default)
    p = dataclasses.replace(plan, t0=time.monotonic())  # a shard's seconds: from its write, not from when the range was planned
    dataset, shard_key, shard_index, prev, keep = p.dataset, p.shard_key, p.shard_index, p.prev, p.keep
    rows = read_raw_rows(p.raw_uri)
    todo = p.todo_rows(rows)
    attempts_before: dict[int, int] = {}
    if prev is not None:
        attempts_before = dict(zip(prev.status["row"].to_pylist(), prev.status["attempts"].to_pylist()))
    by_row = {r["row"]: r for r in todo}

    inputs = [{"prefix": raw_uri_prefix(p.raw_uri), "version": p.raw_version}]
    with storage.new_version(media_prefix(dataset, shard_key), p.identity, inputs=inputs, fresh=p.fresh) as version:
        writer = MediaShardWriter(storage, version)
        status: list[dict[str, Any]] = []
        if keep is not None:
            writer.copy_from(storage, prev.tar_rel(), {k for k in keep["key"].to_pylist() if k})
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
                "detail": redact_text(f.detail), "width": f.width, "height": f.height, "duration_s": f.duration_s,
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
            "raw_uri": p.raw_uri, "raw_version": p.raw_version, "rows_digest": p.rows_digest, "options": p.options,
            "options_digest": options_digest(p.options), "summary": summary, "tar_bytes": writer.bytes,
            "tar_sha256": writer.sha256,
            **({"fetch_options": p.fetch_options} if p.fetch_options is not None else {}),
        })
    s = summary
    log.info(
        f"[{dataset} {shard_key}] committed: {s['succeeded']}/{s['attempted']} succeeded "
        f"({100 * s['success_rate']:.1f}%), failed by reason {s['failed_by_reason'] or '{}'}, "
        f"in {time.monotonic() - p.t0:.1f}s"
    )
    return ShardOutcome(shard_key, False, p.why, manifest["summary"], len(todo), manifest["location"],
                        time.monotonic() - p.t0, manifest)


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
    one_run = n == 1 and hasattr(fetch, "range_session")
    log.info(f"{len(jobs)} shard(s) in this run, " + (
        "through one downloader run, each committed when its rows are done" if one_run else f"{n} at a time"))
    if one_run:
        yield from _one_download(storage, jobs, fetch, log)
        return

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


def _one_download(storage: Storage, jobs: list[ShardJob], fetch: Any, log: Any) -> Iterator[ShardOutcome]:
    """The shards of a range through one downloader run (a fetcher with ``range_session``, e.g. images through
    img2dataset): every shard is planned first (the up-to-date ones are reported at once), the downloader starts
    once on the rows of all the others, and each shard is written and committed, in shard order, as soon as its
    rows are done, while the downloader goes on with the next ones. A shard's identity, version and contents are
    the same as when it is fetched on its own; only the downloader's start-up is paid once per range, not per
    shard, and the commits overlap the downloads. A failure stops the downloader; the committed shards stay."""
    plans: list[ShardPlan] = []
    with fetch.range_session(log) as session:
        for job in jobs:
            plan = plan_shard(storage, log=log, **job.kwargs)
            if isinstance(plan, ShardOutcome):
                yield plan
                continue
            session.add(plan.shard_key, plan.todo_rows())
            plans.append(plan)
        if not plans:
            return
        session.start()
        for plan in plans:
            yield write_shard(storage, plan, session.fetcher(plan.shard_key), log)


#: Failure reasons a retry cannot change (the URL policy, the downloader's own filters, the publisher's opt-out, a
#: YouTube video that is private, age-restricted or gone, a body or an image over the fetch limits); everything else
#: is retried (http_429, rate_limited, timeout, deadline_exceeded, connection_error, dns_error, sign_in_required ...).
NOT_RETRIED = frozenset({"refused_url", "filtered", "opted_out", "private_video", "age_restricted", "video_unavailable",
                         "body_too_large", "too_many_pixels"})


def retryable_failures(storage: Storage, dataset: str, shard: str, rows_digest: str | None) -> dict[str, int]:
    """Failures by reason worth retrying in the committed media shard; {} when none, or when it is not committed
    or was made from other rows than the current raw shard's (a retry would be a full fetch then)."""
    try:
        manifest = storage.read_manifest(media_prefix(dataset, shard))
    except FileNotFoundError:
        return {}
    if rows_digest is not None and manifest.get("rows_digest") != rows_digest:
        return {}
    failed = manifest.get("summary", {}).get("failed_by_reason") or {}
    return {reason: n for reason, n in failed.items() if n and reason not in NOT_RETRIED}
