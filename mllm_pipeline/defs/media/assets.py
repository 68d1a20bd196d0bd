"""Media-shard assets: one partition per raw shard; images through img2dataset, videos through video2dataset.

Each run fetches the shards of its partition (or partition range: a single-run backfill), skips shards that are
already committed for the same rows and options ("up to date"), and reports per shard what was attempted, what
succeeded and what failed, by reason. ``retry_failed: true`` re-attempts only the failed rows of the chosen shards.
Loopback addresses are fetched only with ``allow_loopback: true``; nothing infers it.

With the ``tracking`` resource on, each run logs its per-shard statistics to W&B / TensorBoard (and the images
assets turn img2dataset's own W&B reporting on as well). video2dataset's own W&B reporting stays off: it runs in
the separate video2dataset environment, and its logger process would send the raw error messages (which can hold
URLs with credentials) to W&B; the per-shard statistics the asset logs cover what it would report.
"""


import contextlib
import os
import warnings
from collections.abc import Callable
import json
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.media.metadata import media_checks, media_metadata
from mllm_pipeline.defs.partitions import SHARDS, combined_version, observe_shards, shard_index, shard_rollup
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.defs.plots import tracking_metadata
from mllm_pipeline.download.accounting import merge_totals
from mllm_pipeline.download.guard.proxy import DEFAULT_DISALLOWED_DIRECTIVES
from mllm_pipeline.download.adopt import ADOPT_OPTIONS, adopt_from_tars
from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.download.images import LIMITS as IMAGE_LIMITS, ImageFetcher, ImageOptions, fetch_images, shared_guard
from mllm_pipeline.download.options import ShardRunOptions
from mllm_pipeline.stages.media import CODE_VERSION, ShardJob, ShardOutcome, materialize_range, media_prefix
from mllm_pipeline.download.videos import LIMITS as VIDEO_LIMITS, WORKER, VideoOptions, fetch_videos, guard_for, video2dataset_python
from mllm_pipeline.download.youtube import YouTubePreflightError, js_runtimes_param
from mllm_pipeline.storage import Storage
from mllm_pipeline.tracking import Tracker, TrackingSettings, shard_metrics

GROUP = "media"


class _ShardRunConfig(dg.Config):
    retry_failed: bool = Field(default=False, description="Re-attempt only the rows that failed last time and merge.")
    force: bool = Field(default=False, description="Fetch again even when the shard is committed and up to date.")
    min_success_rate: float = Field(default=0.5, description="The success_rate check fails for a shard below this.")
    user_agent: Optional[str] = Field(default=None, description="User-Agent sent with every request (default: the downloader's).")
    per_host_rate: Optional[float] = Field(default=None, description="At most this many requests per second to one host.")
    disallowed_header_directives: list[str] = Field(
        default=list(DEFAULT_DISALLOWED_DIRECTIVES),
        description="X-Robots-Tag directives that refuse a sample (counted as opted_out, with the directive), for "
        "images and videos, over HTTP and HTTPS. [] honours no opt-out. Changing it re-fetches committed shards.",
    )
    allow_loopback: bool = Field(
        default=os.environ.get("MLLM_ALLOW_LOOPBACK", "") == "1",
        description="Fetch from loopback addresses (local mirrors, the demo's media server). Private and link-local "
        "addresses are never fetched. Off unless set here (or MLLM_ALLOW_LOOPBACK=1 where the code location runs).",
    )
    timeout_s: int = Field(default=10, description="Per-request timeout in seconds.")
    retries: int = Field(default=1, description="Download retries per URL within one run.")
    parallel_shards: int = Field(
        default=1,
        description="Shards of a range fetched at the same time, each by its own img2dataset / video2dataset call "
        "(with its own `processes` worker processes), all behind one guard, so per_host_rate holds for the run as a "
        "whole. 1 (the default), images: the whole range through one img2dataset run, each shard committed as soon "
        "as its rows are done. Speed only: it never changes what a shard holds or its identity. multiprocessing only.",
    )
    distributor: str = Field(
        default="multiprocessing",
        description="How the downloader spreads its shards: multiprocessing (processes on this machine) or pyspark "
        "(Spark tasks on spark_master, through img2dataset's / video2dataset's own pyspark distributor).",
    )
    spark_master: str = Field(default="local[2]", description="With pyspark: local[N] or a cluster URL (spark://host:7077, k8s://https://...).")
    proxy_host: str = Field(
        default="127.0.0.1",
        description="Address the guard proxy listens on. A Spark cluster needs an address of the run's machine that "
        "the executors can reach (e.g. the pod IP).",
    )
    work_dir: Optional[str] = Field(
        default=None,
        description="Scratch directory for the downloader (default: the system temp dir). A Spark cluster needs a "
        "directory mounted at the same path on the run's machine and every executor.",
    )

    def scale_out_options(self) -> dict[str, Any]:
        return {"distributor": self.distributor, "spark_master": self.spark_master, "proxy_host": self.proxy_host,
                "work_dir": self.work_dir}


class ImageShardConfig(_ShardRunConfig):
    image_size: int = Field(default=1680, description="Target size in pixels (meaning depends on resize_mode).")
    resize_mode: str = Field(default="keep_ratio_largest", description="img2dataset resize mode: no, border, keep_ratio, keep_ratio_largest, center_crop.")
    resize_only_if_bigger: bool = Field(default=True, description="Never upscale.")
    encode_format: str = Field(default="jpg", description="jpg, png or webp.")
    encode_quality: int = Field(default=95, description="Encoder quality.")
    processes: int = Field(default=2, description="img2dataset processes.")
    threads: int = Field(default=32, description="img2dataset threads per process.")
    guard: str = Field(
        default="inline",
        description="Where the URL policy, rate limit, 429 back-off, opt-outs and user agent are applied: inline "
        "(inside img2dataset's worker processes, checking each connection; relays nothing) or proxy (a guard proxy "
        "on loopback that relays every byte and sees inside TLS with a per-run CA). The pyspark distributor always "
        "uses the proxy. Both give the same statuses and reasons.",
    )
    guard_processes: int = Field(
        default=1,
        description="guard: proxy only. Relay processes of the guard proxy, accepting from one socket, sharing the "
        "per-host rate limit. One relays ~1,100 HTTP or ~250 HTTPS images/s at 100% of a core; more raise that "
        "ceiling on a machine with spare cores. Speed only. multiprocessing only.",
    )
    max_body_mb: int = Field(
        default=IMAGE_LIMITS["max_body_mb"][0],
        description="Largest response body in MiB (1 to 1024): a Content-Length over it, or a body (chunked or not) "
        "that grows past it, fails as body_too_large (not retried); bounds each worker's memory whatever a server "
        "sends. Raising it fetches again only the rows it refused.",
    )
    deadline_s: float = Field(
        default=IMAGE_LIMITS["deadline_s"][0],
        description="Seconds for one whole response (connect, headers, body; 1 to 3600), however steadily bytes drip "
        "in; timeout_s still bounds each wait for bytes. Over it: deadline_exceeded (retried).",
    )
    max_pixels: int = Field(
        default=IMAGE_LIMITS["max_pixels"][0],
        description="Most pixels (width x height; 1e6 to 1e9) of an image, checked from its header before it is decoded "
        "(OpenCV in img2dataset's workers, Pillow here): over it, too_many_pixels (not retried). Bounds a decode's "
        "memory. Raising it fetches again only the rows it refused.",
    )


def run_shards(
    context: dg.AssetExecutionContext,
    storage: Storage,
    dataset: str,
    config: _ShardRunConfig,
    options: dict[str, Any],
    make_fetch: Callable[..., Callable],
    media_kind: str,
    shared: Optional[Callable[[bool], Any]] = None,
    fetch_options: Optional[dict[str, Any]] = None,
    tracking: Optional[TrackingSettings] = None,
) -> dg.MaterializeResult:
    """The shards of the run's partition (range), ``parallel_shards`` at a time where the config has it.
    ``make_fetch(allow_loopback, guard)`` gives the fetcher; ``shared(allow_loopback)``, when given, opens the one
    guard proxy that shards fetched in parallel share (``guard`` is None otherwise). ``fetch_options``: recorded
    with each shard; a failure one of them caused is fetched again when it changes (stages/media.py).
    ``tracking`` (on): each shard's statistics are logged as one step (:func:`mllm_pipeline.tracking.shard_metrics`,
    in the order shards finish), then a ``shards`` table and the totals as the run's summary."""
    try:
        shards = raw_shards(storage, dataset)
    except FileNotFoundError as e:
        raise dg.Failure(str(e)) from None
    keys = context.partition_keys
    for key in keys:
        if shard_index(key) >= len(shards):
            raise dg.Failure(f"{dataset} has {len(shards)} raw shard(s); there is no {key}. Materialize raw_{dataset} "
                             "again to refresh the partitions.")
    allow_loopback = getattr(config, "allow_loopback", False)  # adopting reads no URL
    parallel = max(1, min(getattr(config, "parallel_shards", 1), len(keys)))
    jobs = []
    for key in keys:
        raw = shards[shard_index(key)]
        jobs.append(ShardJob(key, dict(
            dataset=dataset, shard_key=key, shard_index=raw.index, raw_uri=raw.uri, raw_version=raw.raw_version,
            rows_digest=raw.digest("media"), options=options, retry_failed=config.retry_failed, force=config.force,
            fetch_options=fetch_options)))
    outcomes: list[ShardOutcome] = []
    tracker = Tracker(tracking, "download", {"dataset": dataset, "shards": keys, "options": options,
                                             "fetch_options": fetch_options}) \
        if tracking is not None and tracking.enabled else None
    with contextlib.ExitStack() as stack, \
            (shared(allow_loopback) if shared is not None and parallel > 1 else contextlib.nullcontext()) as guard:
        if tracker is not None:
            stack.enter_context(tracker)
        fetch = make_fetch(allow_loopback, guard)
        for o in materialize_range(storage, jobs, fetch, parallel_shards=parallel, log=context.log):
            outcomes.append(o)
            s = o.summary
            context.log.info(f"progress: {len(outcomes)}/{len(keys)} shard(s) done; {o.shard_key} "
                             f"{'skipped (' + o.reason + ')' if o.skipped else 'committed'}: {s['succeeded']}/"
                             f"{s['attempted']} succeeded in {o.seconds:.1f}s")
            # per shard (the UI shows it on the partition's materialization)
            context.add_asset_metadata({"version": o.manifest["version"], "up_to_date": o.skipped,
                                        "attempted": s["attempted"], "succeeded": s["succeeded"],
                                        "seconds": round(o.seconds, 1)}, partition_key=o.shard_key)
            if tracker is not None:
                tracker.log(shard_metrics(s, o.seconds), step=len(outcomes))
        outcomes.sort(key=lambda o: keys.index(o.shard_key))
        totals = merge_totals(o.summary for o in outcomes)
        links = {}
        if tracker is not None:
            tracker.table("shards", SHARD_COLUMNS, [_shard_row(o) for o in outcomes])
            tracker.summary({k: v for k, v in totals.items() if not isinstance(v, dict)})
            links = tracker.links()
    metadata = observe_shards(context, context.asset_key.to_user_string(), dataset, storage,
                              lambda key: media_prefix(dataset, key),
                              {**media_metadata(storage, dataset, media_kind, outcomes, totals), **tracking_metadata(links)})
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=media_checks(outcomes, config.min_success_rate),
        data_version=dg.DataVersion(combined_version([o.manifest["version"] for o in outcomes])),
    )


SHARD_COLUMNS = ["shard", "skipped", "attempted", "succeeded", "failed", "success_rate", "seconds"]


def _shard_row(o: ShardOutcome) -> list[Any]:
    s = o.summary
    return [o.shard_key, o.skipped, s["attempted"], s["succeeded"], s["failed"], s["success_rate"], round(o.seconds, 2)]


def _check_run_options(config: Any) -> None:
    """The run's own numeric options (min_success_rate, parallel_shards, retries), checked before any work like the
    fetcher's (a Failure naming the field, the value and the allowed range; nothing is read or written)."""
    try:
        ShardRunOptions(min_success_rate=config.min_success_rate, parallel_shards=getattr(config, "parallel_shards", 1),
                        retries=getattr(config, "retries", None))
    except ValueError as e:
        raise dg.Failure(f"{e}. Nothing was fetched or written.") from None


def _check_parallel(config: _ShardRunConfig) -> None:
    if config.parallel_shards > 1 and config.distributor != "multiprocessing":
        raise dg.Failure("parallel_shards > 1 needs distributor: multiprocessing (a Spark cluster spreads one "
                         "shard's work itself)")


def _checks(key: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec("success_rate", asset=key, description="Fails when a shard's share of real, decodable media is below min_success_rate."),
    ]


def image_asset(dataset: str, description: str) -> dg.AssetsDefinition:
    name = f"images_{dataset}"

    with warnings.catch_warnings():  # backfill_policy is marked beta; single-run backfills are what we want
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _image_asset(name, dataset, description)


def _image_asset(name: str, dataset: str, description: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=name, group_name=GROUP, partitions_def=SHARDS[dataset], deps=[f"raw_{dataset}"], kinds={"webdataset"},
        backfill_policy=dg.BackfillPolicy.single_run(), check_specs=_checks(name), description=description,
        pool="downloads", code_version=CODE_VERSION,
    )
    def _asset(context: dg.AssetExecutionContext, config: ImageShardConfig, storage: StorageResource,
               tracking: TrackingResource) -> dg.MaterializeResult:
        _check_run_options(config)
        track = tracking.for_asset(context)
        try:
            base = ImageOptions(
                image_size=config.image_size, resize_mode=config.resize_mode, resize_only_if_bigger=config.resize_only_if_bigger,
                encode_format=config.encode_format, encode_quality=config.encode_quality, processes=config.processes,
                threads=config.threads, timeout_s=config.timeout_s, retries=config.retries, user_agent=config.user_agent,
                per_host_rate=config.per_host_rate, disallowed_header_directives=tuple(config.disallowed_header_directives),
                guard=config.guard,
                guard_processes=config.guard_processes if config.distributor == "multiprocessing" else 1,
                max_body_mb=config.max_body_mb, deadline_s=config.deadline_s, max_pixels=config.max_pixels,
                tracking=track if track.wandb else None, **config.scale_out_options(),
            )
        except ValueError as e:
            raise dg.Failure(f"{e}. Nothing was fetched or written.") from None

        _check_parallel(config)

        def opts_for(allow_loopback: bool) -> ImageOptions:
            return ImageOptions(**{**base.__dict__, "allow_loopback": allow_loopback})

        def make_fetch(allow_loopback: bool, guard: Any = None) -> Callable:
            opts = opts_for(allow_loopback)
            if config.distributor == "multiprocessing":  # a range is fetched by one img2dataset run
                return ImageFetcher(opts, guard, ca_only=storage.get().local)
            return lambda rows, log: fetch_images(rows, log, opts, guard)

        return run_shards(context, storage.get(), dataset, config, base.content_options(), make_fetch, "image",
                          shared=lambda allow_loopback: shared_guard(opts_for(allow_loopback), ca_only=storage.get().local),
                          fetch_options=opts_for(config.allow_loopback).fetch_options(), tracking=track)

    return _asset


class VideoShardConfig(_ShardRunConfig):
    timeout_s: int = Field(default=60, description="Per-request timeout in seconds.")
    processes: int = Field(default=2, description="video2dataset processes.")
    threads: int = Field(default=8, description="video2dataset threads per process.")
    download_size: int = Field(default=360, description="yt-dlp: fetch the smallest video at least this tall.")
    clip_precision: str = Field(default="exact", description="Clip cutting: exact (re-encode at the cut points), keyframe_adjusted or low (stream copy, key frames only).")
    min_clip_s: float = Field(default=0.0, description="Clips shorter than this are dropped by video2dataset.")
    max_clip_s: float = Field(default=999999.0, description="Clips longer than this are split by video2dataset.")
    yt_dlp_options: dict[str, str] = Field(
        default={},
        description="Extra yt-dlp options for YouTube ids, e.g. {cookiefile: /path/cookies.txt, proxy: http://proxy:3128}. "
        "Values are parsed as JSON when they parse (true, 3), else kept as strings. A yt-dlp proxy replaces the guard "
        "proxy for those requests; the URL itself is still checked against the URL policy first. A cookiefile is "
        "checked before a shard with YouTube rows fetches anything (exists, readable, Netscape format).",
    )
    js_runtimes: Optional[list[str]] = Field(
        default=None,
        description="JavaScript runtimes yt-dlp may use for YouTube (it needs one since late 2025), as RUNTIME or "
        "RUNTIME:PATH (the executable or its folder): deno, node, quickjs, bun, e.g. [deno, node:/opt/node/bin/node]. "
        "Replaces yt-dlp's default, which is deno alone (found beside the video2dataset environment's Python, where "
        "`pip install deno` puts it, or on PATH). Checked before a shard with YouTube rows fetches anything.",
    )
    max_body_mb: int = Field(
        default=VIDEO_LIMITS["max_body_mb"][0],
        description="Largest response body in MiB (1 to 16384), per request through the guard proxy (yt-dlp fetches "
        "YouTube in 10 MiB ranges, each a request): over it, body_too_large (not retried). Raising it fetches "
        "again only the rows it refused.",
    )
    deadline_s: float = Field(
        default=VIDEO_LIMITS["deadline_s"][0],
        description="Seconds for one whole response through the guard proxy (connect, headers, body; 1 to 7200), "
        "however steadily bytes drip in. Over it: deadline_exceeded (retried).",
    )


def pipes_launcher(context: dg.AssetExecutionContext) -> Callable:
    """Launch the video2dataset worker in its own environment through Dagster Pipes (logs and stats stream back)."""

    def launch(job: dict[str, Any], env: dict[str, str]) -> Any:
        try:
            python = video2dataset_python()
        except FileNotFoundError as e:
            raise dg.Failure(str(e)) from None
        invocation = dg.PipesSubprocessClient().run(command=[python, str(WORKER)], context=context, extras={"job": job}, env=env)
        return invocation.get_custom_messages()

    return launch


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _yt_dlp_params(config: VideoShardConfig) -> dict[str, Any]:
    """yt_dlp_options (values parsed as JSON where they parse) and js_runtimes, as yt-dlp params."""
    params = {k: _json_or_str(v) for k, v in config.yt_dlp_options.items()}
    if config.js_runtimes is not None:
        params["js_runtimes"] = js_runtimes_param(config.js_runtimes)  # ValueError: a config error
    return params


def video_asset(dataset: str, description: str) -> dg.AssetsDefinition:
    name = f"videos_{dataset}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)

        @dg.asset(
            name=name, group_name=GROUP, partitions_def=SHARDS[dataset], deps=[f"raw_{dataset}"], kinds={"webdataset"},
            backfill_policy=dg.BackfillPolicy.single_run(), check_specs=_checks(name), description=description,
            pool="downloads", code_version=CODE_VERSION,
        )
        def _asset(context: dg.AssetExecutionContext, config: VideoShardConfig, storage: StorageResource,
                   tracking: TrackingResource) -> dg.MaterializeResult:
            _check_run_options(config)
            track = tracking.for_asset(context)
            try:
                base = VideoOptions(
                    processes=config.processes, threads=config.threads, timeout_s=config.timeout_s,
                    download_size=config.download_size, clip_precision=config.clip_precision, min_clip_s=config.min_clip_s,
                    max_clip_s=config.max_clip_s, yt_dlp_params=_yt_dlp_params(config),
                    user_agent=config.user_agent, per_host_rate=config.per_host_rate,
                    disallowed_header_directives=tuple(config.disallowed_header_directives), **config.scale_out_options(),
                    max_body_mb=config.max_body_mb, deadline_s=config.deadline_s,
                )
            except ValueError as e:
                raise dg.Failure(f"{e}. Nothing was fetched or written.") from None
            _check_parallel(config)
            launch = pipes_launcher(context)

            def opts_for(allow_loopback: bool) -> VideoOptions:
                return VideoOptions(**{**base.__dict__, "allow_loopback": allow_loopback})

            def make_fetch(allow_loopback: bool, guard: Any = None) -> Callable:
                opts = opts_for(allow_loopback)

                def fetch(rows: list[dict[str, Any]], log: Any) -> Any:
                    try:
                        yield from fetch_videos(rows, log, opts, launch, guard)
                    except YouTubePreflightError as e:  # nothing fetched: what yt-dlp lacks, and the fix
                        raise dg.Failure(str(e)) from None

                return fetch

            return run_shards(context, storage.get(), dataset, config, base.content_options(), make_fetch, "video",
                              shared=lambda allow_loopback: guard_for(opts_for(allow_loopback)),
                              fetch_options=opts_for(config.allow_loopback).fetch_options(), tracking=track)

    return _asset


images_cc3m = image_asset("cc3m", "CC3M images fetched with img2dataset into webdataset shards, one partition per raw shard.")
images_coco = image_asset("coco", "COCO images (coco_url, or the local images_dir) into webdataset shards, one partition per raw shard.")

videos_webvid = video_asset("webvid", "WebVid videos: the files already on disk (raw_webvid's videos_dir / video2dataset_dir) "
                            "adopted, the others fetched (direct MP4 URLs) with video2dataset, one partition per raw shard.")
videos_msrvtt = video_asset("msrvtt", "MSR-VTT videos: local files from videos_dir, or URLs cut to their clip times.")
videos_internvid = video_asset(
    "internvid", "InternVid clips: those already cut on disk (raw_internvid's clips_dir) adopted; each other YouTube video "
    "fetched once and cut into its clips, each clip with its own caption.")



class AdoptShardConfig(dg.Config):
    retry_failed: bool = Field(default=False, description="Re-read only the rows that failed last time and merge.")
    force: bool = Field(default=False, description="Adopt again even when the shard is committed and up to date.")
    min_success_rate: float = Field(default=0.5, description="The success_rate check fails for a shard below this.")


def adopted_image_asset(dataset: str, description: str) -> dg.AssetsDefinition:
    """Images that are already in webdataset tars (``tar://`` paths in the raw rows): adopted into committed media
    shards with the same status table and checks as downloaded ones; nothing is fetched over the network."""
    name = f"images_{dataset}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)

        @dg.asset(
            name=name, group_name=GROUP, partitions_def=SHARDS[dataset], deps=[f"raw_{dataset}"], kinds={"webdataset"},
            backfill_policy=dg.BackfillPolicy.single_run(), check_specs=_checks(name), description=description,
            code_version=CODE_VERSION,
        )
        def _asset(context: dg.AssetExecutionContext, config: AdoptShardConfig, storage: StorageResource) -> dg.MaterializeResult:
            _check_run_options(config)
            return run_shards(context, storage.get(), dataset, config, ADOPT_OPTIONS, lambda _loopback, _guard=None: adopt_from_tars, "image")

    return _asset


images_cc3m_wds = adopted_image_asset(
    "cc3m_wds", "CC3M images already in webdataset tars (pixparse/cc3m-wds): adopted into media shards, one partition "
    "per raw shard, with the same per-sample status and checks as downloaded images; no download.")

MEDIA_ASSETS = [images_cc3m, images_coco, videos_webvid, videos_msrvtt, videos_internvid, images_cc3m_wds]


def _media_rollup(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
    dataset = asset.partitions_def.name.removesuffix("_shards")
    return shard_rollup(asset.key.to_user_string(), dataset, lambda key: media_prefix(dataset, key), GROUP)


#: the media stages' roll-ups (defs/partitions.py): what the stages reading every media shard depend on
MEDIA_ROLLUPS = [_media_rollup(a) for a in MEDIA_ASSETS]
