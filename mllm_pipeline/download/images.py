"""Image fetching through img2dataset's Python API, behind the URL-policy guard.

Rows with a ``path`` (media already on disk, e.g. COCO with ``images_dir``) are read directly. Rows with a
``url`` are checked for an allowed scheme here (``file://`` and friends never reach a downloader) and then fetched
by ``img2dataset.download`` in a scratch folder, behind a guard that applies the URL policy to every request and
redirect, the per-host rate limit, the 429 back-off, the opt-outs and the user agent. Two guards do that:

* ``guard="inline"`` (the default): :mod:`~mllm_pipeline.download.guard.inline`, installed in img2dataset's own
  worker processes (:mod:`~mllm_pipeline.download.guard.img2dataset_hook`); it checks each connection at the socket and
  relays nothing, so over HTTPS img2dataset talks to the real server directly;
* ``guard="proxy"``: a :class:`~mllm_pipeline.download.guard.proxy.GuardProxy` that img2dataset reaches through
  ``http_proxy``/``https_proxy`` (it sees inside TLS with a per-run CA). The pyspark distributor always uses it:
  Spark executors on other machines share one proxy, and so one per-host rate limit.

An image counts as a success only if it decodes: img2dataset decodes every image it re-encodes (OpenCV); when
re-encoding is off (``resize_mode="no"``) or the file came from disk, this module decodes it fully with Pillow.

Limits on every fetch (:data:`LIMITS`): ``max_body_mb`` and ``deadline_s`` are enforced by the guard (either kind)
on every response; ``max_pixels`` by OpenCV in img2dataset's worker processes (``OPENCV_IO_MAX_IMAGE_PIXELS`` in
their environment: OpenCV refuses from the header, before allocating) and by this module before Pillow decodes.

With ``ImageOptions.tracking`` (W&B on), img2dataset's own W&B reporting is enabled with those settings
(:mod:`~mllm_pipeline.download.img2dataset_wandb`; error messages and config scrubbed of URL secrets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from mllm_pipeline.download.accounting import reason_detail
from mllm_pipeline.download.guard.proxy import DEFAULT_DISALLOWED_DIRECTIVES, GuardProxy
from mllm_pipeline.download.guard.inline import InlineGuard
from mllm_pipeline.download.fetched import Fetched
from mllm_pipeline.download.options import MAX_RETRIES, check_common, check_range
from mllm_pipeline.download.spark import DEFAULT_MASTER, check_spark_options, executor_env, spark_session
from mllm_pipeline.download.guard.url_policy import UrlPolicy
from mllm_pipeline.storage import filesystem_for, scratch_dir
from mllm_pipeline.tracking import TrackingSettings

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
GUARDS = ("inline", "proxy")
#: option -> (default, min, max). Images: 32 MiB holds the largest ordinary photos (a 45-50 MP camera JPEG is
#: 20-30 MB; CC3M / COCO images are mostly under 1 MB) and bounds one worker's bodies in flight (2 x threads of them);
#: 60 s per whole response is 0.5 MB/s for the largest body allowed; 25 MP is a 24 MP camera's original (the HD
#: transform keeps at most 1680 px a side) and bounds a decode (OpenCV: ~6 bytes a pixel, but img2dataset blends an
#: alpha channel in float64, ~72 bytes a pixel: 1.8 GB at 25 MP).
LIMITS = {"max_body_mb": (32, 1, 1024), "deadline_s": (60.0, 1.0, 3600.0), "max_pixels": (25_000_000, 1_000_000, 1_000_000_000)}
LIMIT_UNITS = {"max_body_mb": "MiB of one response body", "deadline_s": "seconds for one whole response",
               "max_pixels": "pixels of one image"}
PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"  # read by OpenCV once, when cv2 is imported (in each spawned worker)


class TooManyPixels(ValueError):
    """An image whose header declares more pixels than the limit (refused before it is decoded)."""


@dataclasses.dataclass
class ImageOptions:
    """What img2dataset is asked to do. The defaults keep enough resolution for the HD transform (HD-25 is 1680
    px wide): the longer side is capped at 1680 px and smaller images are not upscaled."""

    image_size: int = 1680
    resize_mode: str = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    processes: int = 2
    threads: int = 32
    timeout_s: int = 10
    retries: int = 1
    user_agent: str | None = None
    per_host_rate: float | None = None  # requests per second per host; None: unlimited
    # X-Robots-Tag directives that refuse an image (counted as opted_out); () honours none
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES
    allow_loopback: bool = False
    # img2dataset's own distributor: "multiprocessing" (processes on this machine) or "pyspark" (Spark tasks on
    # spark_master; see mllm_pipeline.download.spark for proxy_host and work_dir on a cluster)
    distributor: str = "multiprocessing"
    spark_master: str = DEFAULT_MASTER
    proxy_host: str = "127.0.0.1"  # where the guard proxy listens (an address Spark executors can reach)
    work_dir: str | None = None  # scratch directory (default: the system temp dir); shared mount on a cluster
    # where the URL policy runs: "inline" (inside img2dataset's workers) or "proxy" (a GuardProxy); see the module
    guard: str = "inline"
    guard_processes: int = 1  # relay processes of the guard proxy (speed only; see GuardProxy)
    # limits on every fetch (see LIMITS): body size in MiB, seconds for one whole response, pixels of one image
    max_body_mb: int = LIMITS["max_body_mb"][0]
    deadline_s: float = LIMITS["deadline_s"][0]
    max_pixels: int = LIMITS["max_pixels"][0]
    # with W&B on: img2dataset's own reporting goes there (mllm_pipeline.download.img2dataset_wandb); never part of
    # a shard's identity (not in fetch_options / content_options)
    tracking: TrackingSettings | None = None

    def __post_init__(self) -> None:
        check_spark_options(self.distributor, self.spark_master, self.proxy_host, self.work_dir)
        for name, (_, lo, hi) in LIMITS.items():  # the limits on every fetch
            check_range(name, getattr(self, name), lo, hi, integer=name != "deadline_s", unit=LIMIT_UNITS[name])
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        self.disallowed_header_directives = tuple(sorted({d.strip().lower() for d in self.disallowed_header_directives if d.strip()}))
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ValueError(f"encode_format must be jpg, png or webp, got {self.encode_format!r}")
        if self.guard not in GUARDS:
            raise ValueError(f"guard must be one of {', '.join(GUARDS)}, got {self.guard!r}")
        if self.distributor == "pyspark":
            self.guard = "proxy"  # executors elsewhere share one proxy (one rate limit); see the module
        self.check_ranges()

    def check_ranges(self) -> None:
        """Every numeric option within its range (:class:`~mllm_pipeline.download.options.OptionError` names the
        option, the value and the range): nothing is fetched with a value that would store 1x1 JPEGs as successes
        (``image_size: -100``) or fail every row (``timeout_s: 0``, ``threads: 0``, ``retries: -1``)."""
        check_range("image_size", self.image_size, 16, 16383, unit="pixels")
        if self.encode_format == "png":
            check_range("encode_quality", self.encode_quality, 0, 9, unit="the PNG compression level, with encode_format png")
        else:
            check_range("encode_quality", self.encode_quality, 1, 100, unit=f"the {self.encode_format} quality")
        check_common(self.processes, self.threads, self.timeout_s, self.per_host_rate, self.user_agent)
        check_range("retries", self.retries, 0, MAX_RETRIES, unit="retries per URL within one run")
        check_range("guard_processes", self.guard_processes, 1, 64, unit="relay processes of the guard proxy")

    def fetch_options(self) -> dict[str, Any]:
        """The options that decide whether a URL can be fetched at all (not what is stored): recorded with each shard,
        so a failure they caused is fetched again when they change (:mod:`mllm_pipeline.download.options`)."""
        return {"allow_loopback": self.allow_loopback, "timeout_s": self.timeout_s, "retries": self.retries,
                "user_agent": self.user_agent, "per_host_rate": self.per_host_rate, "deadline_s": self.deadline_s,
                "max_body_mb": self.max_body_mb, "max_pixels": self.max_pixels}

    def content_options(self) -> dict[str, Any]:
        """The options that change what is stored (a change re-fetches committed shards)."""
        return {k: getattr(self, k) for k in ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format",
                                              "encode_quality", "disallowed_header_directives")}

    def policy(self) -> UrlPolicy:
        return UrlPolicy(allow_loopback=self.allow_loopback)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _decode(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """Full decode with Pillow; returns (width, height) or raises (:class:`TooManyPixels` from the header, before
    decoding, for an image of more than ``max_pixels``)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if max_pixels and w * h > max_pixels:
            raise TooManyPixels(f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels} (max_pixels)")
        im.load()
        return im.size


def _not_decoded(row: int, e: Exception) -> Fetched:
    """A failed decode: too_many_pixels for our limit or Pillow's own (``DecompressionBombError``, from the header
    too), else decode_error."""
    from PIL import Image

    if isinstance(e, (TooManyPixels, Image.DecompressionBombError)):
        return Fetched(row, False, "too_many_pixels", str(e))
    return Fetched(row, False, "decode_error", f"{type(e).__name__}: {e}")


def _header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


@contextlib.contextmanager
def shared_guard(options: ImageOptions, ca_only: bool = True) -> Iterator[GuardProxy | InlineGuard]:
    """One guard for several concurrent :func:`fetch_images` calls (the shards of a range fetched in parallel):
    they all go through it, so the per-host rate limit holds across all of them, not per shard. For the proxy, its
    environment is set for the whole block (img2dataset's spawned workers inherit it).

    ``ca_only``: the block's processes trust the guard's per-run CA alone (img2dataset's urllib reloads the CA file
    for every HTTPS connection; one certificate instead of the system bundle saves it ~20 ms of CPU per image).
    Pass False when this process itself makes other TLS connections meanwhile (storage on S3 while other shards
    download), which then need the usual trust store as well."""
    limits = dict(max_body_bytes=options.max_body_mb << 20, deadline_s=options.deadline_s)
    if options.guard == "inline":
        with InlineGuard(options.policy(), user_agent=options.user_agent, per_host_rate=options.per_host_rate,
                         disallowed_directives=options.disallowed_header_directives, work_dir=options.work_dir,
                         **limits) as guard, _environ({PIXELS_ENV: str(options.max_pixels)}):
            yield guard
        return
    with GuardProxy(options.policy(), user_agent=options.user_agent, per_host_rate=options.per_host_rate,
                    host=options.proxy_host, disallowed_directives=options.disallowed_header_directives,
                    processes=options.guard_processes, **limits) as proxy, \
            _environ({**proxy.env(ca_only=ca_only and options.distributor == "multiprocessing"),
                      PIXELS_ENV: str(options.max_pixels)}):
        yield proxy


def _split_rows(rows: list[dict[str, Any]], policy: UrlPolicy
                ) -> tuple[list[Fetched], list[dict[str, Any]], list[dict[str, Any]]]:
    """(outcomes known without fetching: no url, a scheme not allowed; rows read from disk; rows to download)."""
    known: list[Fetched] = []
    local: list[dict[str, Any]] = []
    remote: list[dict[str, Any]] = []
    for r in rows:
        if r.get("path"):
            local.append(r)
        elif not r.get("url"):
            known.append(Fetched(r["row"], False, "download_error", "the row has neither a url nor a path"))
        elif urlsplit(r["url"]).scheme.lower() not in policy.allowed_schemes:
            known.append(Fetched(r["row"], False, "refused_url", f"scheme not allowed: {r['url'][:200]}"))
        else:
            remote.append(r)
    return known, local, remote


def fetch_images(rows: list[dict[str, Any]], log: Any, options: ImageOptions,
                 proxy: GuardProxy | InlineGuard | None = None) -> Iterator[Fetched]:
    """One Fetched per row. ``proxy``: a running :func:`shared_guard` to use (else this call starts its own)."""
    policy = options.policy()
    known, local, remote = _split_rows(rows, policy)
    yield from known
    if local:
        yield from _read_local(local, log, options.max_pixels)
    if remote:
        yield from _img2dataset(remote, log, options, policy, proxy)


class ImageFetcher:
    """:func:`fetch_images` with its options (and a shared guard, or None) bound: the fetcher of the images
    assets. ``range_session`` downloads the shards of a range through one img2dataset run (:class:`RangeDownload`);
    the media stage uses it when the range's shards are not fetched in parallel (``parallel_shards: 1``)."""

    def __init__(self, options: ImageOptions, guard: GuardProxy | InlineGuard | None = None, ca_only: bool = True):
        self.options, self.guard, self.ca_only = options, guard, ca_only

    def __call__(self, rows: list[dict[str, Any]], log: Any) -> Iterator[Fetched]:
        return fetch_images(rows, log, self.options, self.guard)

    def range_session(self, log: Any) -> RangeDownload:
        return RangeDownload(self.options, log, self.guard, self.ca_only)


#: The fewest rows img2dataset gets per task when a range's shards are small. It replaces each worker process after
#: 5 tasks (a new process that imports img2dataset: about a second of CPU), so tasks of one or two rows would cost
#: more in worker start-ups than in fetching; several tiny shards then share one task. Kept small: a shard commits
#: only once every task holding its rows is done, so a run killed halfway loses the tasks in flight.
MIN_TASK_ROWS = 8
_REF = "mllm_ref"  # the column that routes each of img2dataset's results back to its shard and row


class RangeDownload:
    """The remote rows of every shard of a range, fetched by **one** ``img2dataset.download`` run (one worker pool,
    one guard), while the caller commits each shard as soon as its rows are done.

    Use: ``add(shard, rows)`` for every shard in order, ``start()``, then ``fetcher(shard)`` for each shard in the
    same order (it waits for that shard's rows and then yields one :class:`Fetched` per row, like
    :func:`fetch_images`). The rows go to img2dataset as input files of consecutive shards, cut into tasks of
    ``max(MIN_TASK_ROWS, largest shard / processes)`` rows: a shard of 10,000 rows is 2 tasks with 2 processes, as
    when it is fetched alone, and 4 shards of 2 rows share a task. A task is complete when img2dataset writes its
    ``<id>_stats.json`` (after its tar and status table); each result carries an ``mllm_ref`` column (shard
    position and row) that routes it to its shard, so equal sample ids in two shards never mix.

    Leaving the block early (a shard failed to commit, the run was stopped) stops img2dataset: the input files of
    the tasks not started are removed, so the tasks still queued fail at once and only those in flight finish.
    Why this is written here: img2dataset fetches a URL list into numbered shards of its own; a stage that commits
    its shards one by one, from one worker pool, needs the mapping back, which no library provides."""

    def __init__(self, options: ImageOptions, log: Any, shared: GuardProxy | InlineGuard | None = None,
                 ca_only: bool = True):
        self.options, self.log, self.shared, self.ca_only = options, log, shared, ca_only
        self.policy = options.policy()
        self._stack = contextlib.ExitStack()
        self._pieces: list[tuple[str, int]] = []  # (shard, rows to download) in the order added
        self._position: dict[str, int] = {}  # shard -> its position in _pieces
        self._tasks: dict[str, list[int]] = {}  # shard -> img2dataset task ids holding its rows
        self._users: dict[int, int] = {}  # task id -> shards still to collect from it
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._proxy: GuardProxy | InlineGuard | None = None

    def __enter__(self) -> RangeDownload:
        self._tmp = self._stack.enter_context(scratch_dir("mllm-img2dataset-", self.options.work_dir))
        self._in = os.path.join(self._tmp, "pieces")
        self._out = os.path.join(self._tmp, "out")
        os.makedirs(self._in)
        return self

    def add(self, shard: str, rows: list[dict[str, Any]]) -> None:
        """The rows of ``shard`` to fetch (those read from disk or refused need no download and are not kept)."""
        _, _, remote = _split_rows(rows, self.policy)
        n = self._position[shard] = len(self._pieces)
        if remote:
            pq.write_table(pa.table({"url": [r["url"] for r in remote],
                                     _REF: [f"{n}:{r['row']}" for r in remote]}),
                           os.path.join(self._in, f"{n:06d}.parquet"))
        self._pieces.append((shard, len(remote)))

    def start(self) -> None:
        """Cut the added rows into img2dataset's input files and start it in the background."""
        counts = [c for _, c in self._pieces if c]
        if not counts:
            self._done.set()
            return
        per_task = max(MIN_TASK_ROWS, -(-max(counts) // max(1, self.options.processes)))
        target = per_task * max(1, self.options.processes)
        urls = os.path.join(self._tmp, "urls")
        os.makedirs(urls)
        task, group, rows_in_group = 0, [], 0

        def flush() -> None:
            nonlocal task, group, rows_in_group
            if not group:
                return
            tables, offset = [], 0
            for n, shard, count in group:
                tables.append(pq.read_table(os.path.join(self._in, f"{n:06d}.parquet")))
                first, last = task + offset // per_task, task + (offset + count - 1) // per_task
                self._tasks[shard] = list(range(first, last + 1))
                offset += count
            pq.write_table(pa.concat_tables(tables), os.path.join(urls, f"{len(os.listdir(urls)):06d}.parquet"))
            task += -(-offset // per_task)
            group, rows_in_group = [], 0

        for n, (shard, count) in enumerate(self._pieces):
            if not count:
                continue
            group.append((n, shard, count))
            rows_in_group += count
            if rows_in_group >= target:
                flush()
        flush()
        for ids in self._tasks.values():
            for i in ids:
                self._users[i] = self._users.get(i, 0) + 1
        own = contextlib.nullcontext(self.shared) if self.shared is not None else \
            shared_guard(self.options, ca_only=self.ca_only)
        self._proxy = self._stack.enter_context(own)
        self.log.info(f"img2dataset: one run for {sum(counts)} URL(s) of {len(counts)} shard(s), in {task} task(s) "
                      f"of up to {per_task} rows")
        self._thread = threading.Thread(target=self._run, args=(urls, per_task, task, sum(counts)),
                                        name="img2dataset-range", daemon=True)
        self._thread.start()

    def _run(self, urls: str, per_task: int, tasks: int, total: int) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        try:
            import img2dataset

            _signal_safe_in_threads()
            with _inline(self._proxy), _progress(self._out, tasks, self.log), _wandb(self.options) as wandb_args:
                t0 = time.monotonic()
                img2dataset.download(
                    distributor="multiprocessing", url_list=urls, input_format="parquet", url_col="url",
                    save_additional_columns=[_REF], output_folder=self._out, output_format="webdataset",
                    number_sample_per_shard=per_task, **_i2d_options(self.options), **wandb_args)
            self._proxy.sync()
            stats = self._proxy.stats
            self.log.info(f"img2dataset fetched {total} URL(s) in {time.monotonic() - t0:.1f}s ({stats.requests} "
                          f"request(s), refused {dict(stats.refused)}, failed {dict(stats.failed)})")
        except BaseException as e:  # noqa: BLE001 -- reported to the shards waiting for it
            self._error = e
        finally:
            self._done.set()

    def fetcher(self, shard: str) -> Any:
        """The fetcher of ``shard``: yields its rows' outcomes once img2dataset has done its tasks."""
        def fetch(rows: list[dict[str, Any]], log: Any) -> Iterator[Fetched]:
            known, local, remote = _split_rows(rows, self.policy)
            yield from known
            if local:
                yield from _read_local(local, log, self.options.max_pixels)
            if not remote:
                return
            n = self._position[shard]
            ids = self._tasks.get(shard, [])
            self._wait(shard, ids)
            self._proxy.sync()
            by_ref = {f"{n}:{r['row']}": r for r in remote}
            parquets = [os.path.join(self._out, f"{i:05d}.parquet") for i in ids]
            yield from _collect(self._out, by_ref, self.options, self._proxy, parquets=parquets, ref=_REF,
                                release=self._release)
        return fetch

    def _wait(self, shard: str, ids: list[int]) -> None:
        def complete() -> bool:
            return all(os.path.exists(os.path.join(self._out, f"{i:05d}_stats.json")) for i in ids)

        while not complete():
            if self._done.wait(0.2) and not complete():
                if self._error is not None:
                    raise RuntimeError(f"img2dataset stopped before {shard} was fetched: "
                                       f"{type(self._error).__name__}: {self._error}") from self._error
                return  # img2dataset ended without some of the tasks: their rows count as failed

    def _release(self, tar_path: str) -> bool:
        """Whether ``tar_path`` may be removed now (no other shard still reads it)."""
        i = int(os.path.basename(tar_path).split(".")[0])
        self._users[i] = self._users.get(i, 1) - 1
        return self._users[i] <= 0

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._thread is not None and self._thread.is_alive():
                if exc[0] is not None:  # stop it: the tasks not started yet find no input and fail at once
                    self.log.info("stopping img2dataset: the tasks not started yet are dropped")
                    while self._thread.is_alive():
                        for f in glob.glob(os.path.join(self._out, "_tmp", "*.feather")):
                            with contextlib.suppress(OSError):
                                os.remove(f)
                        self._thread.join(0.5)
                else:
                    self._thread.join()
        finally:
            self._stack.close()


def _i2d_options(options: ImageOptions) -> dict[str, Any]:
    """img2dataset's arguments from our options (both ways of calling it use these)."""
    return dict(
        processes_count=options.processes, thread_count=options.threads, timeout=options.timeout_s,
        retries=options.retries, image_size=options.image_size, resize_mode=options.resize_mode,
        resize_only_if_bigger=options.resize_only_if_bigger, encode_format=options.encode_format,
        encode_quality=options.encode_quality, disable_all_reencoding=options.resize_mode == "no",
        incremental_mode="incremental", compute_hash=None,
        # the guard proxy refuses opted-out responses first (and names the directive); img2dataset checks the same
        # list again on what reaches it ([] switches its check off, like an empty list here)
        disallowed_header_directives=list(options.disallowed_header_directives),
    )


def _read_local(rows: list[dict[str, Any]], log: Any, max_pixels: int | None = None) -> Iterator[Fetched]:
    def one(r: dict[str, Any]) -> Fetched:
        try:
            fs, p = filesystem_for(r["path"])
            with fs.open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return Fetched(r["row"], False, "missing_file", f"not found: {r['path']}")
        try:
            w, h = _decode(data, max_pixels)
        except Exception as e:  # noqa: BLE001 -- any decoder error means: not a usable image
            return _not_decoded(r["row"], e)
        ext = os.path.splitext(r["path"])[1].lstrip(".").lower() or "jpg"
        return Fetched(r["row"], True, media=("jpg" if ext == "jpeg" else ext, data), width=w, height=h)

    log.info(f"reading {len(rows)} image(s) from local paths")
    with ThreadPoolExecutor(8) as pool:
        for i in range(0, len(rows), 64):  # a window at a time: memory stays bounded whatever the shard size
            yield from pool.map(one, rows[i:i + 64])


def _img2dataset(rows: list[dict[str, Any]], log: Any, options: ImageOptions, policy: UrlPolicy,
                 shared: GuardProxy | InlineGuard | None = None) -> Iterator[Fetched]:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (imported by img2dataset) phones home
    import img2dataset

    _signal_safe_in_threads()
    by_sample = {r["sample_id"]: r for r in rows}
    per_shard = max(1, -(-len(rows) // max(1, options.processes)))  # one img2dataset shard per process
    with scratch_dir("mllm-img2dataset-", options.work_dir) as tmp:  # a killed run's goes with the next run
        url_list = os.path.join(tmp, "urls.parquet")
        pq.write_table(pa.table({"url": [r["url"] for r in rows], "sample_id": [r["sample_id"] for r in rows]}), url_list)
        out = os.path.join(tmp, "out")
        own = contextlib.nullcontext(shared) if shared is not None else shared_guard(options)
        with own as proxy, _spark(options, proxy, log), _keep_sigint(), _inline(proxy), \
                _progress(out, -(-len(rows) // per_shard), log), _wandb(options) as wandb_args:
            t0 = time.monotonic()
            img2dataset.download(
                distributor=options.distributor,
                url_list=url_list, input_format="parquet", url_col="url", save_additional_columns=["sample_id"],
                output_folder=out, output_format="webdataset", number_sample_per_shard=per_shard,
                **_i2d_options(options), **wandb_args,
            )
            seconds = time.monotonic() - t0
            proxy.sync()  # a multi-process guard: every count and verdict of this download has reached this process
            kind = "inline guard" if isinstance(proxy, InlineGuard) else "guard proxy"
        if shared is None:
            log.info(f"img2dataset fetched {len(rows)} URL(s) in {seconds:.1f}s "
                     f"through the {kind} ({proxy.stats.requests} request(s), refused {dict(proxy.stats.refused)}, "
                     f"failed {dict(proxy.stats.failed)}; guard CPU {proxy.cpu_seconds or 0:.3f}s)")
        else:
            log.info(f"img2dataset fetched {len(rows)} URL(s) in {seconds:.1f}s through the run's shared {kind}")
        yield from _collect(out, by_sample, options, proxy)


_SIGNAL_LOCK = threading.Lock()


def _signal_safe_in_threads() -> None:
    """img2dataset.download installs a SIGINT handler, which Python allows only in the main thread; when shards are
    fetched in parallel its calls run in worker threads. There the handler is not installed (the run's own SIGINT
    handling stays in charge); in the main thread nothing changes."""
    import importlib
    import signal

    i2d_main = importlib.import_module("img2dataset.main")  # the module (the package's `main` is a function)
    with _SIGNAL_LOCK:
        if getattr(i2d_main.signal, "_mllm_thread_safe", False):
            return

        class _Signal:
            _mllm_thread_safe = True

            def __getattr__(self, name: str) -> Any:
                return getattr(signal, name)

            @staticmethod
            def signal(signum: int, handler: Any) -> Any:
                if threading.current_thread() is threading.main_thread():
                    return signal.signal(signum, handler)
                return signal.getsignal(signum)

        i2d_main.signal = _Signal()


def _collect(out: str, by_sample: dict[str, dict[str, Any]], options: ImageOptions,
             proxy: GuardProxy | InlineGuard, parquets: list[str] | None = None, ref: str = "sample_id",
             release: Any = None) -> Iterator[Fetched]:
    """Every row's outcome from img2dataset's output: its status tables and tars, the tars read as streams, one
    member at a time (memory does not grow with the shard). ``parquets``: the status tables to read (default: all
    in ``out``); ``ref``: the column that names the row (``by_sample``'s keys); ``release(tar)``: whether a tar
    read may be removed now (default: yes)."""
    import tarfile

    seen: set[str] = set()
    decoded_by_img2dataset = options.resize_mode != "no"

    def stored(r: dict[str, Any], data: bytes) -> Fetched:
        try:
            w, h = _header_size(data) if decoded_by_img2dataset else _decode(data, options.max_pixels)
        except Exception as e:  # noqa: BLE001
            return _not_decoded(r["row"], e)
        return Fetched(r["row"], True, media=(options.encode_format, data), width=w, height=h)

    for parquet in sorted(glob.glob(os.path.join(out, "*.parquet"))) if parquets is None else parquets:
        if not os.path.exists(parquet):
            continue  # a task img2dataset did not finish: its rows count as failed
        meta = [{**m, "sample_id": m[ref]} for m in
                pq.read_table(parquet, columns=["key", "status", "error_message", ref]).to_pylist()]
        ok = {m["key"]: m for m in meta if m["status"] == "success"}
        tar_path = parquet[: -len(".parquet")] + ".tar"
        found: set[str] = set()
        if ok and os.path.exists(tar_path):
            with tarfile.open(tar_path, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    m = ok.get(key)
                    if m is None or ext != options.encode_format or key in found:
                        continue
                    found.add(key)
                    r = by_sample.get(m["sample_id"])
                    if r is None or m["sample_id"] in seen:
                        continue
                    seen.add(m["sample_id"])
                    yield stored(r, tar.extractfile(member).read())
            if release is None or release(tar_path):
                os.remove(tar_path)  # collected: the scratch copy goes now, not when the whole shard is done
        for m in meta:
            r = by_sample.get(m["sample_id"])
            if r is None or m["sample_id"] in seen:
                continue
            seen.add(m["sample_id"])
            if m["status"] != "success":
                _, verdict = proxy.verdict(r["url"])
                reason, detail = reason_detail(m["error_message"], verdict)
                yield Fetched(r["row"], False, reason, detail)
            else:
                yield Fetched(r["row"], False, "download_error", "img2dataset reported success but stored no image")


@contextlib.contextmanager
def _wandb(options: ImageOptions) -> Iterator[dict[str, Any]]:
    """img2dataset's own W&B arguments: off, or (``options.tracking`` with W&B on) its reporting enabled with those
    settings, as a run named ``<run name>/img2dataset`` in the tracked run's group (one per call: per shard)."""
    settings = options.tracking
    if settings is None or not settings.wandb:
        yield {"enable_wandb": False}
        return
    from mllm_pipeline.download.img2dataset_wandb import reporting

    with reporting(settings, f"{settings.run_name}/img2dataset") as args:
        yield args


@contextlib.contextmanager
def _inline(guard: GuardProxy | InlineGuard) -> Iterator[None]:
    """img2dataset's workers started in this block install the inline guard (nothing to do for the proxy)."""
    if not isinstance(guard, InlineGuard):
        yield
        return
    from mllm_pipeline.download.guard.img2dataset_hook import guarded

    with guarded(guard.settings):
        yield


@contextlib.contextmanager
def _spark(options: ImageOptions, proxy: GuardProxy, log: Any) -> Iterator[None]:
    """For the pyspark distributor: an active SparkSession whose Python workers use the guard proxy."""
    if options.distributor != "pyspark":
        yield
        return
    with spark_session(options.spark_master) as spark, \
            executor_env(spark, {**proxy.env(), "NO_ALBUMENTATIONS_UPDATE": "1", PIXELS_ENV: str(options.max_pixels)}):
        log.info(f"img2dataset distributes its shards over Spark ({spark.sparkContext.master})")
        yield


@contextlib.contextmanager
def _keep_sigint() -> Iterator[None]:
    """img2dataset installs its own SIGINT handler (exit 0); give the caller's back afterwards."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def _progress(out: str, shards: int, log: Any, every_s: float = 10.0) -> Iterator[None]:
    """Log how many img2dataset shards have finished while it runs (it writes <n>_stats.json per shard)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            done = len(glob.glob(os.path.join(out, "*_stats.json")))
            log.info(f"img2dataset: {done}/{shards} shard(s) finished")

    t = threading.Thread(target=watch, name="img2dataset-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
