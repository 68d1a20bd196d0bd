"""Benchmark: video downloads through the videos_webvid asset against the bare video2dataset CLI, same URLs, same run.

    .venv/bin/python bench/videos_bench.py                      # 100 videos, 3 repeats of each contender
    .venv/bin/python bench/videos_bench.py --videos 20 --repeats 1   # a quick check

What it does (see bench/README.md for the figures):

1. Generates, once, ``--videos`` distinct small H.264 MP4s (``--size``, default 320x180, 12 fps, 3-8 s, moving
   content) with PyAV into the workdir (default ``bench/out/``, git-ignored), with a ``.json`` sidecar.
2. Serves them from a threaded HTTP server on loopback (``mllm_pipeline_tests.media_server``, a thread of this parent
   process) and writes the same URLs twice: a CSV with a ``url`` column for video2dataset and a WebVid-format CSV
   (``videoid,contentUrl,duration,page_dir,name``) for the raw asset.
3. For ``--repeats`` rounds runs, alternately, each in a fresh child process:

   * ``baseline``: the bare ``video2dataset`` CLI of the video2dataset environment (``.venv-video2dataset``, or
     ``$MLLM_VIDEO2DATASET_PYTHON``'s), ``--input_format csv --url_col url --output_format webdataset
     --encode_formats {"video": "mp4"}`` and a config file with exactly the config the asset passes for whole
     videos (no subsampling, i.e. no clipping and no resizing; the same processes, threads, timeout, yt-dlp
     arguments, shard size and oom_shard_count);
   * ``ours``: ``dagster.materialize`` of the ``videos_webvid`` asset, partition ``shard-00000``, over a raw shard of
     the same URLs (made beforehand, untimed, by materializing ``raw_webvid`` from the CSV into a fresh storage root
     and an ephemeral Dagster instance), with ``allow_loopback: true``. This includes the guard proxy, the
     video2dataset worker launched through Dagster Pipes, the PyAV check of every video (a video stream, a decoded
     frame, duration > 0), the rewrite into the media shard's tar, the status table and the commit.

   The baseline's time is the wall time of the CLI process (interpreter start and imports included: video2dataset
   imports torch); "ours" pays the same imports in its worker process, inside the timed ``materialize``. Idle-CPU
   waiting and the contention check are those of ``images_bench.py``.
4. Prints a per-run log and a summary: per contender the median and best seconds, videos/s and successes; the
   ratio of ours/baseline throughput (target >= 0.8) and whether both stored the same number of videos.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from images_bench import (
    add_common_args,
    HERE,
    REPO,
    asset_child_setup,
    clean_env,
    finish_run,
    header,
    git_state,
    measure_repeats,
    sidecar_ok,
    summarize,
    work_cpu,
)

GEN_VERSION = 1
TARGET = 0.8

# the videos_webvid asset's defaults (VideoShardConfig)
ASSET_DEFAULTS = {"processes": 2, "threads": 8, "timeout": 60, "download_size": 360}


def v2d_python() -> Path:
    env = os.environ.get("MLLM_VIDEO2DATASET_PYTHON")
    return Path(env) if env else REPO / ".venv-video2dataset" / "bin" / "python"


def generate_videos(dest: Path, count: int, width: int, height: int, seed: int = 5) -> dict:
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    fps = 12
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    total, seconds_total = 0, 0
    for i in range(count):
        seconds = int(rng.integers(3, 9))
        base = rng.uniform(40, 200, 3).astype(np.float32)
        fx, fy = rng.uniform(5, 20, 2)
        box = int(rng.integers(height // 8, height // 3))
        path = dest / f"{i:04d}.mp4"
        with av.open(str(path), "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.options = {"preset": "veryfast", "crf": "28"}
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for f in range(seconds * fps):
                frame = np.empty((height, width, 3), dtype=np.float32)
                for ch in range(3):
                    frame[..., ch] = base[ch] + 50 * np.sin((x + 3 * f * (ch + 1)) / fx) + 30 * np.cos((y - 2 * f) / fy)
                cx = (f * 5 + i * 7) % max(1, width - box)
                cy = (f * 3 + i * 11) % max(1, height - box)
                frame[cy:cy + box, cx:cx + box] = (250, 240, 30)
                frame += rng.normal(0, 3, (height, width, 1)).astype(np.float32)
                img = np.clip(frame, 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        total += path.stat().st_size
        seconds_total += seconds
    return {"count": count, "bytes": total, "seconds": seconds_total, "size": f"{width}x{height}", "seed": seed}


def ensure_videos(workdir: Path, count: int, size: str) -> tuple[Path, dict]:
    root = workdir / f"videos-{count}-{size}"
    meta_path = workdir / f"videos-{count}-{size}.json"
    if not sidecar_ok(meta_path, {"gen_version": GEN_VERSION, "count": count, "size": size}) or \
            len(list((root / "vid").glob("*.mp4"))) != count:
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {count:,} MP4s ({size}) into {root} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate", str(count), "--size", size,
                        "--out", str(root / "vid"), "--result", str(meta_path)], check=True)
        print(f"generated in {time.perf_counter() - t0:.0f}s", flush=True)
    return root, json.loads(meta_path.read_text())


def asset_config(options: dict) -> dict:
    """The video2dataset config the asset builds for whole videos (videos.py ``_one_call``, clips=False)."""
    per_shard = max(1, math.ceil(options["videos"] / max(1, options["processes"])))
    return {
        "subsampling": {},
        "reading": {"yt_args": {"download_size": options["download_size"], "download_audio_rate": 44100, "yt_metadata_args": {}},
                    "timeout": options["timeout"], "sampler": None},
        "storage": {"number_sample_per_shard": per_shard, "oom_shard_count": 5, "captions_are_subtitles": False},
        "distribution": {"processes_count": options["processes"], "thread_count": options["threads"], "subjob_size": 1000,
                         "distributor": "multiprocessing"},
    }


def child_baseline(cmd_json: str, result: str) -> None:
    cmd = json.loads(cmd_json)
    c0, t0 = work_cpu(), time.perf_counter()
    rc = subprocess.run(cmd).returncode
    Path(result).write_text(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": work_cpu() - c0, "rc": rc}))


def child_ours(csv: str, root: str, options: dict, result: str) -> None:
    dg, instance, resources = asset_child_setup(Path(root), "raw_webvid", {"paths": [csv], "rows_per_shard": options["videos"]})
    from mllm_pipeline.defs.media.assets import videos_webvid
    from mllm_pipeline.stages.media import iter_shard, read_status
    from mllm_pipeline.storage import Storage

    config = {"allow_loopback": True, "processes": options["processes"], "threads": options["threads"],
              "timeout_s": options["timeout"], "download_size": options["download_size"]}
    c0, t0 = work_cpu(), time.perf_counter()
    r = dg.materialize([videos_webvid], partition_key="shard-00000", instance=instance, resources=resources,
                       run_config={"ops": {"videos_webvid": {"config": config}}})
    seconds, cpu = time.perf_counter() - t0, work_cpu() - c0
    assert r.success
    status = read_status(Storage(root), "webvid", "shard-00000")
    reasons: dict[str, int] = {}
    ok = 0
    for s, why in zip(status.column("status").to_pylist(), status.column("reason").to_pylist()):
        if s == "success":
            ok += 1
        else:
            reasons[why] = reasons.get(why, 0) + 1
    in_tar = sum(1 for _, files in iter_shard(Storage(root), "webvid", "shard-00000") if "mp4" in files)
    Path(result).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "successes": ok, "attempted": status.num_rows,
                                        "in_tar": in_tar, "failed_by_reason": reasons}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=100, help="distinct generated MP4s served and fetched (default 100)")
    ap.add_argument("--size", default="320x180", help="frame size of the generated videos (default 320x180)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each contender, alternating (default 3)")
    ap.add_argument("--workdir", default=str(HERE / "out"), help="where the videos are cached and runs write (default bench/out)")
    ap.add_argument("--processes", type=int, default=ASSET_DEFAULTS["processes"])
    ap.add_argument("--threads", type=int, default=ASSET_DEFAULTS["threads"])
    ap.add_argument("--timeout", type=int, default=ASSET_DEFAULTS["timeout"])
    add_common_args(ap)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    if args.generate:
        meta = generate_videos(Path(args.out), args.generate, w, h)
        meta["gen_version"] = GEN_VERSION
        Path(args.result).write_text(json.dumps(meta))
        return
    if args.child == "baseline":
        return child_baseline(args.cmd, args.result)
    if args.child == "ours":
        return child_ours(args.csv, args.root, json.loads(args.options), args.result)

    from images_bench import run_child

    sys.path.append(str(REPO))  # the tests' media server (mllm_pipeline_tests is not installed: the checkout's)
    from mllm_pipeline_tests.media_server import serve_directory

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = header("video download benchmark", workdir)
    cli = v2d_python().with_name("video2dataset")
    if not cli.exists():
        raise SystemExit(f"no video2dataset CLI at {cli}: run scripts/setup.sh (or set MLLM_VIDEO2DATASET_PYTHON)")
    options = {**ASSET_DEFAULTS, "processes": args.processes, "threads": args.threads, "timeout": args.timeout,
               "videos": args.videos}
    config = asset_config(options)
    print(f"video2dataset config (both contenders): {json.dumps(config)}", flush=True)
    root, meta = ensure_videos(workdir, args.videos, args.size)
    print(f"{meta['count']:,} MP4s {meta['size']}, {meta['seconds']:,} s of video, {meta['bytes'] / 2**20:.1f} MiB "
          f"({meta['bytes'] / meta['count'] / 1024:.0f} KiB each on average)", flush=True)
    for p in sorted((root / "vid").glob("*.mp4")):
        p.read_bytes()
    config_path = workdir / "videos-v2d-config.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML; OmegaConf.load reads it

    with serve_directory(root) as server:
        urls = [f"{server.base_url}/vid/{i:04d}.mp4" for i in range(args.videos)]
        url_csv = workdir / "videos-urls.csv"
        url_csv.write_text("url\n" + "".join(f"{u}\n" for u in urls))
        webvid_csv = workdir / "videos-results_bench_train.csv"
        webvid_csv.write_text("videoid,contentUrl,duration,page_dir,name\n" + "".join(
            f"{1_000_000 + i},{u},PT00H00M05S,000001_000050,generated video number {i}\n" for i, u in enumerate(urls)))
        print(f"serving them at {server.base_url}", flush=True)

        def one_run(name: str) -> dict:
            out_dir = workdir / f"run-videos-{name}"
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            result = workdir / f".result-videos-{name}.json"
            result.unlink(missing_ok=True)
            me = [sys.executable, str(Path(__file__).resolve())]
            log = workdir / f"log-videos-{name}.txt"
            if name == "baseline":
                cmd = [str(cli), "--url_list", str(url_csv), "--input_format", "csv", "--url_col", "url",
                       "--output_format", "webdataset", "--output_folder", str(out_dir / "wds"),
                       "--encode_formats", '{"video": "mp4"}', "--config", str(config_path),
                       "--tmp_dir", str(out_dir / "tmp"), "--enable_wandb", "False", "--incremental_mode", "incremental"]
                (out_dir / "tmp").mkdir()
                info = run_child(me + ["--child", "baseline", "--cmd", json.dumps(cmd), "--result", str(result)], log, clean_env())
            else:
                info = run_child(me + ["--child", "ours", "--csv", str(webvid_csv), "--root", str(out_dir / "root"),
                                       "--options", json.dumps(options), "--result", str(result)], log, clean_env())
            if info["rc"] != 0 or not result.exists():
                raise SystemExit(f"{name} failed (exit status {info['rc']}); see {log}")
            finish_run(info, name, result, out_dir, "mp4", "videos", args.videos, args.keep)
            return info

        runs = measure_repeats({"baseline": None, "ours": None}, args.repeats, args.wait_idle, args.retries, one_run)
    summary = summarize(runs, TARGET, "videos")
    print(f"total {time.perf_counter() - T0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "cpus": os.cpu_count(), "git": git_state(),
                                               "config": config, "videos": meta, "summary": summary, "runs": runs},
                                              indent=2, default=str))


T0 = time.perf_counter()

if __name__ == "__main__":
    main()
