"""Video fetching through video2dataset, in its own Python environment, behind the URL-policy guard proxy.

* WebVid: one direct MP4 URL per row.
* Rows with a ``path`` (videos already on disk: MSR-VTT's ``videos_dir``, WebVid's ``videos_dir`` /
  ``video2dataset_dir``, InternVid's cut clips in ``clips_dir``) are adopted: read from the file, or from the
  ``tar://<member>::<tar>`` it names (each tar read once, :func:`mllm_pipeline.download.adopt.adopt_from_tars`), and
  checked like a download. Their URL is never requested; a clip on disk is already cut and is not cut again.
* InternVid (and any rows with clip times): rows that share a URL are fetched **once** and cut into their clips
  by video2dataset's clipping subsampler; each clip is matched back to its own row (and so keeps its caption) by
  its start/end time.

video2dataset runs as a separate process (``v2d_worker.py`` under the video2dataset environment's Python);
the caller supplies how to launch it (the Dagster asset uses Dagster Pipes; :func:`subprocess_launcher` is the
plain alternative). Every request it makes goes through a :class:`GuardProxy` started here.

A video counts as a success only if PyAV finds a video stream, decodes a frame from it and the duration is
above zero: video2dataset 1.3.0 stores whatever body a server returns (a 404 page, say) as an ``.mp4``. When it
does, the proxy's record of the response gives the real reason (``http_404``); otherwise it is ``not_media``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from mllm_pipeline.download.accounting import reason_detail
from mllm_pipeline.download.adopt import adopt_from_tars, parse_tar_path
from mllm_pipeline.download.guard.proxy import DEFAULT_DISALLOWED_DIRECTIVES, GuardProxy
from mllm_pipeline.download.fetched import Fetched
from mllm_pipeline.download.options import check_common, check_range, digest_value
from mllm_pipeline.download.spark import DEFAULT_MASTER, check_spark_options
from mllm_pipeline.download.youtube import is_youtube_url, youtube_preflight
from mllm_pipeline.download.guard.url_policy import UrlPolicy
from mllm_pipeline.storage import filesystem_for, scratch_dir

WORKER = Path(__file__).with_name("v2d_worker.py")
VENV_ENV = "MLLM_VIDEO2DATASET_PYTHON"
CLIP_TOLERANCE_S = 0.05

#: launch(job, env) runs the worker and returns its summary (or raises)
Launcher = Callable[[dict[str, Any], dict[str, str]], Any]

#: option -> (default, min, max), enforced by the guard proxy on every response video2dataset, yt-dlp and ffmpeg
#: receive. 256 MiB: WebVid / MSR-VTT clips are a few MB, and yt-dlp fetches YouTube streams in 10 MiB ranges (each
#: its own response), while video2dataset holds a direct download in memory a few times over (threads x processes of
#: them); 300 s per whole response is 0.9 MB/s for the largest body allowed.
LIMITS = {"max_body_mb": (256, 1, 16384), "deadline_s": (300.0, 1.0, 7200.0)}
LIMIT_UNITS = {"max_body_mb": "MiB of one response body", "deadline_s": "seconds for one whole response",
               "max_pixels": "pixels of one image"}


@dataclasses.dataclass
class VideoOptions:
    processes: int = 2
    threads: int = 8
    timeout_s: int = 60
    download_size: int = 360  # yt-dlp: the smallest video at least this tall
    # video2dataset ClippingSubsampler: "exact" re-encodes around the cut points; "low" copies streams and can only
    # cut at key frames (clips come out wrong or missing when key frames are sparse)
    clip_precision: str = "exact"
    min_clip_s: float = 0.0
    max_clip_s: float = 999999.0
    yt_dlp_params: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"cookiefile": "...", "proxy": "..."}
    user_agent: str | None = None
    per_host_rate: float | None = None
    # X-Robots-Tag directives that refuse a video (the guard proxy answers 403; counted as opted_out)
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES
    allow_loopback: bool = False
    # video2dataset's own distributor: "multiprocessing" or "pyspark" (the worker makes the SparkSession for
    # spark_master; see mllm_pipeline.download.spark for proxy_host and work_dir on a cluster)
    distributor: str = "multiprocessing"
    spark_master: str = DEFAULT_MASTER
    proxy_host: str = "127.0.0.1"
    work_dir: str | None = None
    # limits on every response through the guard proxy (see LIMITS): body size in MiB, seconds for one response
    max_body_mb: int = LIMITS["max_body_mb"][0]
    deadline_s: float = LIMITS["deadline_s"][0]

    def __post_init__(self) -> None:
        check_spark_options(self.distributor, self.spark_master, self.proxy_host, self.work_dir)
        for name, (_, lo, hi) in LIMITS.items():  # the limits on every fetch
            check_range(name, getattr(self, name), lo, hi, integer=name != "deadline_s", unit=LIMIT_UNITS[name])
        if self.clip_precision not in ("low", "keyframe_adjusted", "exact"):
            raise ValueError(f"clip_precision must be low, keyframe_adjusted or exact, got {self.clip_precision!r}")
        self.disallowed_header_directives = tuple(sorted({d.strip().lower() for d in self.disallowed_header_directives if d.strip()}))
        self.check_ranges()

    def check_ranges(self) -> None:
        """Every numeric option within its range (:class:`~mllm_pipeline.download.options.OptionError` names the
        option, the value and the range), before anything is fetched."""
        check_common(self.processes, self.threads, self.timeout_s, self.per_host_rate, self.user_agent)
        check_range("download_size", self.download_size, 1, 4320, unit="video height in pixels that yt-dlp fetches")
        check_range("min_clip_s", self.min_clip_s, 0, 86400, integer=False, unit="seconds")
        check_range("max_clip_s", self.max_clip_s, self.min_clip_s, 999999, integer=False, lo_open=True,
                    unit="seconds, more than min_clip_s")

    def fetch_options(self) -> dict[str, Any]:
        """The options that decide whether a URL can be fetched at all (recorded with each shard, so a failure they
        caused is fetched again when they change); yt-dlp's options as a digest (cookie files, a proxy URL)."""
        return {"allow_loopback": self.allow_loopback, "timeout_s": self.timeout_s, "user_agent": self.user_agent,
                "per_host_rate": self.per_host_rate, "deadline_s": self.deadline_s, "max_body_mb": self.max_body_mb,
                "yt_dlp_params": digest_value(self.yt_dlp_params)}

    def content_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("download_size", "clip_precision", "min_clip_s", "max_clip_s",
                                              "disallowed_header_directives")}

    def policy(self) -> UrlPolicy:
        return UrlPolicy(allow_loopback=self.allow_loopback)


def video2dataset_python() -> str:
    """The video2dataset environment's interpreter: ``$MLLM_VIDEO2DATASET_PYTHON``, else ``.venv-video2dataset``."""
    if os.environ.get(VENV_ENV):
        return os.environ[VENV_ENV]
    here = Path(__file__).resolve().parents[2] / ".venv-video2dataset" / "bin" / "python"
    if here.exists():
        return str(here)
    raise FileNotFoundError(
        "No video2dataset environment: run scripts/setup.sh (it creates .venv-video2dataset), or set "
        f"{VENV_ENV} to the Python of an environment with video2dataset==1.3.0, 'pyarrow<18' and dagster-pipes."
    )


def subprocess_launcher(job: dict[str, Any], env: dict[str, str]) -> Any:
    """Run the worker as a plain subprocess (no Dagster); its output goes to this process's stdout/stderr."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        subprocess.run([video2dataset_python(), str(WORKER), f.name], env={**os.environ, **env}, check=True)
    finally:
        os.unlink(f.name)


def video_info(data: bytes) -> tuple[int, int, float]:
    """(width, height, duration seconds) of a video that has a decodable video stream; raises otherwise."""
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        frame = next(container.decode(stream), None)
        if frame is None:
            raise ValueError("no decodable video frame")
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        if not duration > 0:
            raise ValueError("duration is zero")
        return frame.width, frame.height, duration


def guard_for(options: VideoOptions) -> GuardProxy:
    """The guard proxy of a video fetch; enter it once and pass it to several concurrent :func:`fetch_videos` calls
    (the shards of a range fetched in parallel), so the per-host rate limit and the 429 back-off hold across them."""
    return GuardProxy(options.policy(), user_agent=options.user_agent, per_host_rate=options.per_host_rate,
                      host=options.proxy_host, disallowed_directives=options.disallowed_header_directives,
                      max_body_bytes=options.max_body_mb << 20, deadline_s=options.deadline_s)


def fetch_videos(rows: list[dict[str, Any]], log: Any, options: VideoOptions, launch: Launcher,
                 proxy: GuardProxy | None = None) -> Iterator[Fetched]:
    """One Fetched per row. ``proxy``: a running :func:`guard_for` to use (else this call starts its own).
    Rows fetched from YouTube need the YouTube preflight first: it raises ``YouTubePreflightError`` (what is
    missing, and the fix) before anything of the shard is fetched."""
    youtube = sum(1 for r in rows if not r.get("path") and is_youtube_url(r.get("url")))
    if youtube:
        youtube_preflight(options.yt_dlp_params, rows=youtube, log=log)
    policy = options.policy()
    local, remote = [], []
    for r in rows:
        if r.get("path"):
            local.append(r)
        elif not r.get("url"):
            yield Fetched(r["row"], False, "download_error", "the row has neither a url nor a path")
        elif urlsplit(r["url"]).scheme.lower() not in policy.allowed_schemes:
            yield Fetched(r["row"], False, "refused_url", f"scheme not allowed: {r['url'][:200]}")
        else:
            remote.append(r)
    if local:
        log.info(f"adopting {len(local)} video(s) already on disk (no request); fetching {len(remote)} by URL")
    in_tars = [r for r in local if parse_tar_path(r["path"]) is not None]
    for r in local:
        if parse_tar_path(r["path"]) is None:
            yield _read_local(r)
    if in_tars:
        yield from adopt_from_tars(in_tars, log, check=_checked, what="video(s)")
    if remote:
        yield from _video2dataset(remote, log, options, launch, proxy)


def _read_local(r: dict[str, Any]) -> Fetched:
    try:
        fs, p = filesystem_for(r["path"])
        with fs.open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Fetched(r["row"], False, "missing_file", f"not found: {r['path']}")
    return _checked(r, r["path"], data)


def _checked(r: dict[str, Any], name: str, data: bytes) -> Fetched:
    """A video from disk: a success only if it decodes like a downloaded one (:func:`video_info`)."""
    try:
        w, h, d = video_info(data)
    except Exception as e:  # noqa: BLE001 -- any decoder error means: not a usable video
        return Fetched(r["row"], False, "decode_error", f"{name}: {type(e).__name__}: {e}"[:500])
    return Fetched(r["row"], True, media=("mp4", data), width=w, height=h, duration_s=d)


def _has_clip(r: dict[str, Any]) -> bool:
    return r.get("clip_start_s") is not None and r.get("clip_end_s") is not None


def _video2dataset(rows: list[dict[str, Any]], log: Any, options: VideoOptions, launch: Launcher,
                   shared: GuardProxy | None) -> Iterator[Fetched]:
    clipped = [r for r in rows if _has_clip(r)]
    whole = [r for r in rows if not _has_clip(r)]
    with scratch_dir("mllm-video2dataset-", options.work_dir) as tmp, \
            (contextlib.nullcontext(shared) if shared is not None else guard_for(options)) as proxy:
        for name, group, clips in (("whole", whole, False), ("clips", clipped, True)):
            if group:
                yield from _one_call(Path(tmp) / name, group, clips, log, options, proxy, launch, shared is not None)


def _one_call(work: Path, rows: list[dict[str, Any]], clips: bool, log: Any, options: VideoOptions, proxy: GuardProxy,
              launch: Launcher, shared: bool = False) -> Iterator[Fetched]:
    work.mkdir(parents=True)
    # one input row per distinct URL ("vid"); clip rows that share a URL are fetched once
    urls: dict[str, int] = {}
    members: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        vid = urls.setdefault(r["url"], len(urls))
        members.setdefault(vid, []).append(r)
    table = {"url": list(urls), "vid": list(range(len(urls)))}
    if clips:
        table["clips"] = [[[m["clip_start_s"], m["clip_end_s"]] for m in members[v]] for v in range(len(urls))]
    pq.write_table(pa.table(table), work / "urls.parquet")
    per_shard = max(1, math.ceil(len(urls) / max(1, options.processes)))
    config = {
        "subsampling": {"ClippingSubsampler": {"args": {"min_length": options.min_clip_s, "max_length": options.max_clip_s,
                                                        "precision": options.clip_precision}}} if clips else {},
        "reading": {"yt_args": {"download_size": options.download_size, "download_audio_rate": 44100, "yt_metadata_args": {}},
                    "timeout": options.timeout_s, "sampler": None},
        "storage": {"number_sample_per_shard": per_shard, "oom_shard_count": 5, "captions_are_subtitles": False},
        "distribution": {"processes_count": options.processes, "thread_count": options.threads, "subjob_size": 1000,
                         "distributor": options.distributor},
    }
    job = {"url_list": str(work / "urls.parquet"), "output_folder": str(work / "out"), "config": config,
           "clip_col": "clips" if clips else None, "tmp_dir": str(work / "tmp"), "rows": len(urls),
           "expected_shards": math.ceil(len(urls) / per_shard)}
    yt_errors = work / "yt_dlp_errors.jsonl"
    env = {**proxy.env(), "MLLM_YT_DLP_PARAMS": json.dumps(options.yt_dlp_params), "MLLM_YT_DLP_ERRORS": str(yt_errors)}
    if options.distributor == "pyspark":
        job["spark"] = {"master": options.spark_master, "executor_env": env}
    t0 = time.monotonic()
    launch(job, env)
    through = "the run's shared guard proxy so far" if shared else "the guard proxy"  # shared: all shards' counts
    log.info(f"video2dataset fetched {len(urls)} video(s) for {len(rows)} row(s) in {time.monotonic() - t0:.1f}s "
             f"({proxy.stats.requests} request(s) through {through}, refused {dict(proxy.stats.refused)}, "
             f"failed {dict(proxy.stats.failed)})")
    yield from _collect(work / "out", urls, members, clips, proxy, _yt_dlp_errors(yt_errors))


def _yt_dlp_errors(path: Path) -> dict[str, str]:
    """url -> yt-dlp's last error message for it (see v2d_worker: video2dataset loses it)."""
    found: dict[str, str] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    rec = json.loads(line)
                    found[rec["url"]] = rec["error"]
    return found


def _collect(out: Path, urls: dict[str, int], members: dict[int, list[dict[str, Any]]], clips: bool, proxy: GuardProxy,
             yt_errors: dict[str, str] | None = None) -> Iterator[Fetched]:
    by_vid_url = {v: u for u, v in urls.items()}
    yt_errors = yt_errors or {}
    errors: dict[int, str] = {}
    for parquet in sorted(out.glob("*.parquet")):
        for m in pq.read_table(parquet).to_pylist():
            if m.get("status") != "success" and m.get("vid") is not None:
                vid = int(m["vid"])
                # yt-dlp's own message beats video2dataset's (a missing temporary file)
                errors[vid] = yt_errors.get(by_vid_url.get(vid, "")) or m.get("error_message") or "video2dataset reported a failure"
    done: set[int] = set()  # rows
    for tar_path in sorted(out.glob("*.tar")):
        for meta, data in _samples(tar_path):
            vid = int(meta["vid"])
            if clips:
                span = (meta.get("clips") or [[None, None]])[0]
                row = _match_clip(members.get(vid, []), span, done)
            else:
                row = members[vid][0] if vid in members and members[vid][0]["row"] not in done else None
            if row is None:
                continue
            done.add(row["row"])
            try:
                w, h, d = video_info(data)
            except Exception as e:  # noqa: BLE001
                status, verdict = proxy.verdict(by_vid_url[vid])
                if verdict:
                    yield Fetched(row["row"], False, *verdict)
                elif status is not None and status >= 400:
                    yield Fetched(row["row"], False, f"http_{status}", f"video2dataset stored the HTTP {status} body as media")
                else:
                    yield Fetched(row["row"], False, "not_media", f"{type(e).__name__}: {e}")
                continue
            yield Fetched(row["row"], True, media=("mp4", data), width=w, height=h, duration_s=d,
                          extra={"source_clip": span} if clips else {})
    for vid, rs in members.items():
        for r in rs:
            if r["row"] in done:
                continue
            msg = errors.get(vid)
            status, verdict = proxy.verdict(by_vid_url[vid])
            if msg is None and verdict:
                yield Fetched(r["row"], False, *verdict)
            elif msg is None:
                yield Fetched(r["row"], False, "download_error", "video2dataset produced no clip for this row (clip dropped by the clipping limits?)")
            else:
                reason, detail = reason_detail(msg, verdict)
                if reason == "download_error" and status is not None and status >= 400:
                    reason = f"http_{status}"
                yield Fetched(r["row"], False, reason, readable_detail(detail))


def _samples(tar_path: Path) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(metadata, mp4 bytes) per sample of a video2dataset tar, read as a stream: a sample's members are adjacent,
    so only one sample is held at a time, whatever the tar's size."""
    key, files = None, {}
    with tarfile.open(tar_path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.partition(".")
            if k != key:
                if "mp4" in files and "json" in files:
                    yield json.loads(files["json"]), files["mp4"]
                key, files = k, {}
            if ext in ("mp4", "json"):
                files[ext] = tar.extractfile(member).read()
    if "mp4" in files and "json" in files:
        yield json.loads(files["json"]), files["mp4"]


def readable_detail(message: str) -> str:
    """A yt-dlp or video2dataset error message as a failure detail: without the temporary paths (``<tmp>``) and the
    ``ERROR: [youtube] id:`` prefix, at most 500 characters."""
    import re

    msg = re.sub(r"(/tmp|/var/folders)/\S+", "<tmp>", message or "")
    msg = re.sub(r"^(ERROR: )?(\[[a-z]+\] [\w-]+: )", "", msg.strip())
    return msg[:500]


def _match_clip(candidates: list[dict[str, Any]], span: list, done: set[int]) -> dict[str, Any] | None:
    try:
        start, end = float(span[0]), float(span[1])
    except (TypeError, ValueError, IndexError):
        return None
    best, best_err = None, CLIP_TOLERANCE_S
    for r in candidates:
        if r["row"] in done:
            continue
        err = max(abs(r["clip_start_s"] - start), abs(r["clip_end_s"] - end))
        if err <= best_err:
            best, best_err = r, err
    return best

