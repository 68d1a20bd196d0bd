"""Runs video2dataset inside its own Python environment (``.venv-video2dataset``), launched as a script.

This file imports only the standard library, ``dagster_pipes`` and ``video2dataset`` -- never ``mllm_pipeline``
-- because the video2dataset environment pins an old torch/numpy/pyarrow that the main environment must not share.

Launched by a Dagster asset through Dagster Pipes, it reads its job from the Pipes extras and reports progress,
logs and per-shard statistics back; run by hand it reads the same job from a JSON file::

    .venv-video2dataset/bin/python mllm_pipeline/download/v2d_worker.py job.json

The job: ``url_list`` (a Parquet file with ``url``, ``vid`` and optionally ``clips``), ``output_folder``,
``config`` (video2dataset's config dict), ``clip_col`` (``"clips"`` or null), ``tmp_dir`` and ``yt_dlp_params``
(extra yt-dlp options such as ``cookiefile`` or ``proxy``, applied to every yt-dlp call) and, for video2dataset's
``pyspark`` distributor, ``spark``: ``{"master": ..., "executor_env": {...}}`` -- the worker then makes the
SparkSession that video2dataset distributes its shards through (or uses one already active) and hands
``executor_env`` (the guard proxy's variables) to Spark's Python workers.
"""

import contextlib
import glob
import json
import os
import sys
import threading
import time

YT_DLP_PARAMS_ENV = "MLLM_YT_DLP_PARAMS"


YT_DLP_ERRORS_ENV = "MLLM_YT_DLP_ERRORS"


def _apply_yt_dlp_params() -> None:
    """video2dataset 1.3.0 builds its yt-dlp options itself; merge the user's (cookies, proxy, ...) into each call,
    and keep yt-dlp's own error messages.

    * yt-dlp loads certifi's CA bundle instead of the CA-bundle variables; the guard proxy's per-run CA is in
      ``SSL_CERT_FILE``, so yt-dlp is told to use the system store (which honours the variable) when it is set.
    * video2dataset swallows a failed ``ydl.download`` and then fails deleting the file that was never written,
      so the only message left is a temporary path; each failure's real message ("Sign in to confirm you're not a
      bot", "Video unavailable", a DNS error ...) is appended to the JSON-lines file named by
      ``MLLM_YT_DLP_ERRORS`` before video2dataset sees it.

    Runs at import, so the worker processes video2dataset spawns (which re-import this file) get it too."""
    extra = json.loads(os.environ.get(YT_DLP_PARAMS_ENV) or "{}")
    if os.environ.get("SSL_CERT_FILE"):
        extra.setdefault("compat_opts", ["no-certifi"])
    errors_file = os.environ.get(YT_DLP_ERRORS_ENV)
    if not extra and not errors_file:
        return
    import yt_dlp

    if getattr(yt_dlp.YoutubeDL, "_mllm_params", None) == (extra, errors_file):
        return

    original = getattr(yt_dlp.YoutubeDL, "_mllm_original_init", yt_dlp.YoutubeDL.__init__)
    original_download = getattr(yt_dlp.YoutubeDL, "_mllm_original_download", yt_dlp.YoutubeDL.download)

    def init(self, params=None, *args, **kwargs):
        merged = {**(params or {}), **extra}
        if "compat_opts" in merged:
            merged["compat_opts"] = set(merged["compat_opts"])
        original(self, merged, *args, **kwargs)

    def download(self, url_list):
        try:
            return original_download(self, url_list)
        except Exception as e:
            if errors_file:
                urls = [url_list] if isinstance(url_list, str) else list(url_list)
                line = "".join(json.dumps({"url": u, "error": str(e)[:2000]}) + "\n" for u in urls)
                with open(errors_file, "a", encoding="utf-8") as f:  # one short append per failure
                    f.write(line)
            raise

    yt_dlp.YoutubeDL.__init__ = init
    yt_dlp.YoutubeDL.download = download
    yt_dlp.YoutubeDL._mllm_original_init = original
    yt_dlp.YoutubeDL._mllm_original_download = original_download
    yt_dlp.YoutubeDL._mllm_params = (extra, errors_file)


_apply_yt_dlp_params()


class _Reporter:
    """Pipes when launched by Dagster, else plain prints."""

    def __init__(self, pipes):
        self.pipes = pipes

    def info(self, msg: str) -> None:
        if self.pipes is not None:
            self.pipes.log.info(msg)
        else:
            print(msg, flush=True)

    def message(self, payload: dict) -> None:
        if self.pipes is not None:
            self.pipes.report_custom_message(payload)
        else:
            print(json.dumps(payload), flush=True)


def _watch(out: str, shards: int, report: _Reporter, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        done = len(glob.glob(os.path.join(out, "*_stats.json")))
        report.info(f"video2dataset: {done}/{shards} shard(s) finished")


class _InSparkWorker:
    """Wraps video2dataset's shard worker for Spark: Spark's Python workers never import this file (as spawned
    processes do), so the yt-dlp options are applied here, once per Python worker. Defined in the script that runs
    as ``__main__``, it is pickled by value and needs nothing of this file on the executors."""

    def __init__(self, worker):
        self.worker = worker

    def __call__(self, shard):
        _apply_yt_dlp_params()
        return self.worker(shard)


@contextlib.contextmanager
def _spark(spec, report):
    """The SparkSession video2dataset's pyspark distributor picks up (it takes the active one)."""
    if not spec:
        yield
        return
    import video2dataset.main
    from pyspark.sql import SparkSession

    spark, owned = SparkSession.getActiveSession(), False
    if spark is None:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this environment
        spark = (SparkSession.builder.master(spec["master"]).appName("mllm-pipeline-video2dataset")
                 .config("spark.ui.showConsoleProgress", "false").getOrCreate())
        owned = True
    spark.sparkContext.environment.update(spec.get("executor_env") or {})
    distribute = video2dataset.main.pyspark_distributor
    video2dataset.main.pyspark_distributor = lambda n, worker, *rest: distribute(n, _InSparkWorker(worker), *rest)
    try:
        yield
        jobs = len(spark.sparkContext.statusTracker().getJobIdsForGroup(None))
        report.info(f"video2dataset ran {jobs} Spark job(s) on {spark.sparkContext.master}")
    finally:
        video2dataset.main.pyspark_distributor = distribute
        if owned:
            spark.stop()


def run(job: dict, report: _Reporter) -> dict:
    from video2dataset import video2dataset

    out = job["output_folder"]
    os.makedirs(job["tmp_dir"], exist_ok=True)
    shards = int(job.get("expected_shards", 1))
    report.info(f"video2dataset: {job['rows']} video(s) in {shards} shard(s), "
                f"{job['config']['distribution']['processes_count']} process(es)")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(out, shards, report, stop, float(job.get("progress_every_s", 10))), daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        with _spark(job.get("spark"), report):
            video2dataset(
                url_list=job["url_list"], output_folder=out, output_format="webdataset", input_format="parquet",
                url_col="url", clip_col=job.get("clip_col"), save_additional_columns=["vid"], enable_wandb=False,
                encode_formats={"video": "mp4"}, incremental_mode="incremental", tmp_dir=job["tmp_dir"],
                config=job["config"],
            )
    finally:
        stop.set()
        watcher.join()
    stats = []
    for path in sorted(glob.glob(os.path.join(out, "*_stats.json"))):
        with open(path) as f:
            s = json.load(f)
        stats.append({k: s.get(k) for k in ("count", "successes", "failed_to_download", "failed_to_subsample", "duration")})
    summary = {"seconds": round(time.monotonic() - t0, 2), "shards": stats}
    report.message({"video2dataset_stats": summary})
    report.info(f"video2dataset finished in {summary['seconds']}s")
    return summary


def main() -> int:
    if os.environ.get("DAGSTER_PIPES_CONTEXT"):
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            run(dict(pipes.extras["job"]), _Reporter(pipes))
        return 0
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        run(json.load(f), _Reporter(None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
