"""Benchmark: peak memory (RSS) of collecting a large video shard and of grouping an InternVid-size file.

    .venv/bin/python bench/memory_bench.py                                   # 10,000 clips; 1M and 10M InternVid rows
    .venv/bin/python bench/memory_bench.py --clips 2000 --internvid-rows 200000   # a quick check

Each measurement runs in a fresh child process and reports that process's peak RSS (``ru_maxrss``):

1. **Video shard collection** (``--clips``): a video2dataset output folder with one tar of ``--clips`` samples (real
   MP4s, ``<key>.mp4`` + ``<key>.json``) and its status table is collected into a committed media shard by the real
   path (``videos._collect``: every clip decoded with PyAV, then ``materialize_shard`` writes the media tar, the
   status table and the manifest). ``baseline`` is the same with the collection of before this change (the whole
   tar read into a dict first); ``ours`` streams the tar a member at a time.
2. **InternVid grouping** (``--internvid-rows``, comma-separated sizes): a generated JSON-lines file in InternVid's
   format (about 10 clips a video) is ingested by ``ingest_internvid`` (parse, validate, group per video, write raw
   shards). ``baseline`` sorts all kept clips in memory (as before); ``ours`` is the external sort.

The ratio printed is baseline RSS / ours RSS; what matters is that "ours" stays flat as the input grows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- 1. video shard --------------------------------------------------------------------------------------------
def make_video_output(work: Path, clips: int) -> Path:
    out = work / f"v2d-{clips}"
    if (out / "done").exists():
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mllm_pipeline.demo.generate import write_mp4

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    bodies = []
    for i in range(8):
        p = work / f"src-{i}.mp4"
        write_mp4(p, 2 + i % 3, rng)
        bodies.append(p.read_bytes())
    with tarfile.open(out / "00000.tar", "w") as tar:
        for i in range(clips):
            key = f"{i:09d}"
            for ext, data in (("mp4", bodies[i % 8]), ("json", json.dumps({"vid": i, "key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                import io

                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"vid": list(range(clips)), "status": ["success"] * clips,
                             "error_message": pa.nulls(clips, pa.string())}), out / "00000.parquet")
    (out / "done").write_text("ok")
    return out


def _whole_tar_samples(tar_path):
    """The collection before this change: every member of the tar read into memory, then yielded."""
    current: dict = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                current.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for files in current.values():
        if "mp4" in files and "json" in files:
            yield json.loads(files["json"]), files["mp4"]


def child_video(out: str, root: str, mode: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mllm_pipeline.download import videos
    from mllm_pipeline.download.guard.proxy import GuardProxy
    from mllm_pipeline.stages.media import materialize_shard
    from mllm_pipeline.download.guard.url_policy import UrlPolicy
    from mllm_pipeline.storage import Storage

    if mode == "baseline":
        videos._samples = _whole_tar_samples
    n = pq.read_metadata(os.path.join(out, "00000.parquet")).num_rows
    raw = os.path.join(root, "raw.parquet")
    os.makedirs(root, exist_ok=True)
    pq.write_table(pa.table({"sample_id": [f"c-{i}" for i in range(n)], "url": [f"http://example.com/{i}.mp4" for i in range(n)],
                             "path": pa.nulls(n, pa.string()), "captions": [[f"clip {i}"] for i in range(n)],
                             "clip_start_s": pa.nulls(n, pa.float64()), "clip_end_s": pa.nulls(n, pa.float64()),
                             "duration_s": pa.nulls(n, pa.float64())}), raw)
    rss_before = _rss_mb()

    def fetch(rows, log):
        urls = {r["url"]: int(r["url"].rsplit("/", 1)[1].split(".")[0]) for r in rows}
        members = {urls[r["url"]]: [r] for r in rows}
        return videos._collect(Path(out), urls, members, False, GuardProxy(UrlPolicy()))

    t0 = time.monotonic()
    result = materialize_shard(Storage(root), dataset="webvid", shard_key="shard-00000", shard_index=0, raw_uri=raw,
                               raw_version="v1", options={}, fetch=fetch)
    return {"seconds": round(time.monotonic() - t0, 1), "succeeded": result.summary["succeeded"],
            "rss_before_mb": round(rss_before), "peak_rss_mb": round(_rss_mb())}


# -- 2. InternVid ----------------------------------------------------------------------------------------------
def make_internvid(work: Path, rows: int) -> Path:
    path = work / f"internvid-{rows}.jsonl"
    if path.exists():
        return path
    rng = random.Random(rows)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    videos = ["".join(rng.choice(alphabet) for _ in range(11)) for _ in range(max(1, rows // 10))]
    words = "a man woman dog cat is are walking running cooking in the on a street kitchen park beach with".split()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        buf = []
        for i in range(rows):
            s = rng.randrange(0, 3000)
            e = s + rng.randrange(1, 20)
            cap = " ".join(rng.choice(words) for _ in range(rng.randrange(6, 14)))
            buf.append(f'{{"YoutubeID": "{rng.choice(videos)}", "Start_timestamp": "{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{i % 1000:03d}", '
                       f'"End_timestamp": "{e // 3600:02d}:{e // 60 % 60:02d}:{e % 60:02d}.{i % 1000:03d}", "Caption": "{cap}", '
                       f'"Aesthetic_Score": {rng.random() * 10:.3f}, "UMT_Score": {rng.random():.3f}}}\n')
            if len(buf) == 100_000:
                f.write("".join(buf))
                buf = []
        f.write("".join(buf))
    tmp.rename(path)
    return path


def child_internvid(path: str, root: str, mode: str) -> dict:
    from mllm_pipeline.sources import internvid
    from mllm_pipeline.storage import Storage

    if mode == "baseline":
        internvid.SORT_RUN_ROWS = 10**12  # never spill: every kept clip sorted in memory, as before
    rss_before = _rss_mb()
    t0 = time.monotonic()
    report = internvid.ingest_internvid([path], Storage(root))
    return {"seconds": round(time.monotonic() - t0, 1), "rows": getattr(report, "rows_kept", None),
            "rss_before_mb": round(rss_before), "peak_rss_mb": round(_rss_mb())}


def run_child(kind: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=10_000)
    ap.add_argument("--internvid-rows", default="1000000,10000000")
    ap.add_argument("--baseline-max-rows", type=int, default=10_000_000, help="skip the in-memory baseline above this size")
    ap.add_argument("--workdir", default=str(HERE / "out" / "memory"))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_video(*rest) if kind == "video" else child_internvid(*rest)))
        return 0
    import shutil

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    if args.clips:
        out = make_video_output(work, args.clips)
        tar_mb = (out / "00000.tar").stat().st_size / 2**20
        for mode in ("baseline", "ours"):
            root = work / f"root-video-{mode}"
            shutil.rmtree(root, ignore_errors=True)
            r = run_child("video", str(out), str(root), mode)
            shutil.rmtree(root, ignore_errors=True)
            print(f"video shard, {args.clips} clips ({tar_mb:.0f} MB tar), {mode}: {r}", flush=True)
            results.append(("video", args.clips, mode, r))
    for rows in [int(x) for x in args.internvid_rows.split(",") if x]:
        t0 = time.monotonic()
        path = make_internvid(work, rows)
        print(f"InternVid file: {rows:,} rows, {path.stat().st_size / 2**20:.0f} MB (made in {time.monotonic() - t0:.0f}s)", flush=True)
        for mode in ("baseline", "ours"):
            if mode == "baseline" and rows > args.baseline_max_rows:
                continue
            root = work / f"root-internvid-{mode}"
            shutil.rmtree(root, ignore_errors=True)
            r = run_child("internvid", str(path), str(root), mode)
            shutil.rmtree(root, ignore_errors=True)
            print(f"InternVid grouping, {rows:,} rows, {mode}: {r}", flush=True)
            results.append(("internvid", rows, mode, r))
    print("\nsummary (peak RSS of the child process)")
    by = {(k, n, m): r for k, n, m, r in results}
    for (k, n, m), r in by.items():
        if m != "ours":
            continue
        base = by.get((k, n, "baseline"))
        ratio = f", baseline {base['peak_rss_mb']} MB ({base['peak_rss_mb'] / r['peak_rss_mb']:.1f}x ours)" if base else ""
        print(f"  {k:9s} {n:>11,}: ours {r['peak_rss_mb']} MB in {r['seconds']}s{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
