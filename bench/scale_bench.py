"""Benchmark: one CC3M-shaped run end to end through the real Dagster CLI, against the bare img2dataset CLI.

    .venv/bin/python bench/scale_bench.py                          # 50,000 images, shards of 10,000 rows
    .venv/bin/python bench/scale_bench.py --also-parallel 2        # ... and the fetch again with parallel_shards 2
    .venv/bin/python bench/scale_bench.py --images 2000 --rows-per-shard 500   # a quick check (~3 min)

What it does (figures and how to read them: bench/README.md, "Scale: one CC3M-shaped run"):

1. Generates, once, ``--images`` distinct small JPEGs (each side 128-448 px: CC3M-like photos are larger, see the
   README for what that changes) into ``--workdir`` (default ``bench/out/scale``, git-ignored), and a CC3M-format TSV
   (``caption<TAB>url``) of them with hypernymised-style captions, served from a threaded loopback HTTP server
   (``mllm_pipeline_tests.media_server``, a thread of this process, so both contenders share its cost).
2. **baseline**: the bare ``img2dataset`` CLI over the same URLs with the options the asset passes (processes,
   threads, image size, resize mode, encoding, timeout, retries, shard size), in a child process.
3. **ours**: every stage through ``dagster asset materialize`` (a fresh ``DAGSTER_HOME`` with the default SQLite
   instance and a fresh storage root), each a child process: ``raw_cc3m`` (ingest), ``images_cc3m`` over the whole
   partition range (fetch), ``captions_cc3m`` over the range, ``media_hashes``, ``captions_dedup``, ``manifests``
   (a tokenizer trained on the spot), and the exports (``export_media`` then the four trainer formats).
4. Then, Dagster's own cost: the fetch range again with every shard up to date (nothing fetched: the run launch,
   the per-partition events and the skip checks), the number of events it wrote, and the CLI's start-up alone.
5. With ``--also-parallel N``: the fetch once more (``force: true``) with ``parallel_shards: N``: one img2dataset
   call per shard, N at a time, against the default (the whole range through one img2dataset run, each shard
   committed while the next ones download).

Per stage it prints wall seconds, CPU seconds (the child and its reaped descendants, from ``os.wait4``) and peak
RSS; for the fetch, the wall ratio against the baseline (goal <= 1.25) and the CPU seconds per image beyond the
baseline's; for the others, CPU seconds per image; and extrapolations to 3.3M images (CC3M) and 10.7M clips
(WebVid, row-bound stages only: the media-bound costs of clips were not measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.images_bench import baseline_cmd, clean_env, count_baseline, cpu_busy_seconds, header  # noqa: E402

GEN_VERSION = 1
CC3M_IMAGES = 3_318_333
WEBVID_CLIPS = 10_727_607
RATIO_GOAL = 1.25
OPTIONS = {"image_size": 256, "resize_mode": "keep_ratio_largest", "resize_only_if_bigger": True,
           "encode_format": "jpg", "encode_quality": 95, "processes": 2, "threads": 32, "timeout": 10, "retries": 1}

NOUNS = ["actor", "person", "dog", "city", "building", "car", "tree", "beach", "mountain", "river", "flower", "bird",
         "house", "street", "team", "player", "woman", "man", "child", "boat", "bridge", "garden", "road", "horse"]
VERBS = ["attends", "walks past", "stands near", "looks at", "plays with", "runs along", "sits by", "waits at"]
ADJ = ["old", "young", "red", "small", "large", "white", "black", "green", "quiet", "busy", "famous", "wooden"]


def _caption(i: int) -> str:
    n = len(NOUNS)
    return (f"{ADJ[i % 12]} {NOUNS[(i // 12) % n]} {VERBS[(i // 7) % 8]} the {ADJ[(i // 96) % 12]} "
            f"{NOUNS[(i // 5) % n]} in the {NOUNS[(i // 288) % n]} scene {i % 997}")


def _gen_range(args: tuple[str, int, int]) -> int:
    import numpy as np
    from PIL import Image

    out, start, stop = args
    total = 0
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        w, h = (int(x) for x in rng.integers(128, 449, 2))
        small = rng.integers(0, 256, (int(rng.integers(4, 10)), int(rng.integers(4, 10)), 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-6, 7, (h, w, 1)), 0, 255).astype(np.uint8)
        path = Path(out) / f"{i // 10000:03d}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, "JPEG", quality=85)
        total += path.stat().st_size
    return total


def ensure_inputs(workdir: Path, count: int) -> tuple[Path, dict]:
    root = workdir / f"www-{count}"
    meta_path = workdir / f"www-{count}.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("gen_version") == GEN_VERSION:
        return root, json.loads(meta_path.read_text())
    shutil.rmtree(root, ignore_errors=True)
    print(f"generating {count:,} JPEGs into {root} ...", flush=True)
    t0 = time.perf_counter()
    step = 2000
    with ProcessPoolExecutor(os.cpu_count() or 2) as pool:
        total = sum(pool.map(_gen_range, [(str(root / "img"), s, min(count, s + step)) for s in range(0, count, step)]))
    meta = {"gen_version": GEN_VERSION, "count": count, "bytes": total}
    meta_path.write_text(json.dumps(meta))
    print(f"generated {count:,} JPEGs, {total / 2**20:.0f} MiB, in {time.perf_counter() - t0:.0f}s", flush=True)
    return root, meta


def run(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
    """A child process: wall, CPU (with its reaped descendants) and peak RSS (the largest of them), from wait4."""
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit(f"{' '.join(cmd[:8])} ... failed ({rc}); see {log}")
    cpu = ru.ru_utime + ru.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": ru.ru_maxrss / 1024,
            "machine_busy_cores": (cpu_busy_seconds() - busy0) / wall}


def dagster(env: dict[str, str], workdir: Path, name: str, select: str, config: dict | None = None,
            partition_range: str | None = None) -> dict:
    cmd = [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "mllm_pipeline.definitions",
           "--select", select]
    if partition_range:
        cmd += ["--partition-range", partition_range]
    if config:
        cfg = workdir / f"{name}.json"
        cfg.write_text(json.dumps(config))
        cmd += ["--config-json", cfg.read_text()]
    r = run(cmd, workdir / f"{name}.log", env)
    print(f"  {name:<16} {r['wall_s']:8.1f} s wall {r['cpu_s']:8.1f} s CPU  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
          f"(machine busy {r['machine_busy_cores']:.1f} cores)", flush=True)
    return r


def events_of_last_run(home: Path) -> tuple[int, int]:
    """(events, asset events) the last run wrote to the SQLite event log."""
    db = home / "history" / "runs.db"
    with sqlite3.connect(db) as c:
        run_id = c.execute("select run_id from runs order by id desc limit 1").fetchone()[0]
    with sqlite3.connect(home / "history" / "runs" / f"{run_id}.db") as c:
        total = c.execute("select count(*) from event_logs").fetchone()[0]
        assets = c.execute("select count(*) from event_logs where dagster_event_type in "
                           "('ASSET_MATERIALIZATION', 'ASSET_OBSERVATION')").fetchone()[0]
    return total, assets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--rows-per-shard", type=int, default=10_000)
    ap.add_argument("--workdir", type=Path, default=HERE / "out" / "scale")
    ap.add_argument("--parallel-shards", type=int, default=1,
                    help="the fetch's parallel_shards (default 1, the asset's default)")
    ap.add_argument("--also-parallel", type=int, default=0,
                    help="at the end, fetch every shard again (force: true) with this parallel_shards")
    ap.add_argument("--fetch-only", action="store_true", help="stop after the fetch (baseline, ingest, fetch)")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    a = ap.parse_args()

    from mllm_pipeline_tests.media_server import serve_directory

    a.workdir.mkdir(parents=True, exist_ok=True)
    header("scale_bench", a.workdir)
    www, meta = ensure_inputs(a.workdir, a.images)
    n, shards = a.images, -(-a.images // a.rows_per_shard)
    run_dir = a.workdir / f"run-{n}" if a.parallel_shards == 1 else a.workdir / f"run-{n}-p{a.parallel_shards}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    home, root = run_dir / "dagster_home", run_dir / "root"
    home.mkdir()
    env = clean_env({"DAGSTER_HOME": str(home), "MLLM_STORAGE_ROOT": str(root), "PYTHONWARNINGS": "ignore"})
    figures: dict = {"images": n, "shards": shards, "rows_per_shard": a.rows_per_shard, "bytes": meta["bytes"],
                     "options": OPTIONS}
    keys = f"shard-00000...shard-{shards - 1:05d}"

    with serve_directory(www) as server:
        urls = [f"{server.base_url}/img/{i // 10000:03d}/{i:07d}.jpg" for i in range(n)]
        (run_dir / "urls.txt").write_text("\n".join(urls) + "\n")
        tsv = run_dir / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"{_caption(i)}\t{u}\n" for i, u in enumerate(urls)))

        print(f"{n:,} images ({meta['bytes'] / 2**20:.0f} MiB), {shards} shard(s) of {a.rows_per_shard:,} rows; "
              f"img2dataset processes={OPTIONS['processes']} threads={OPTIONS['threads']}", flush=True)
        print("baseline: the bare img2dataset CLI", flush=True)
        base_out = run_dir / "baseline"
        per_shard = -(-a.rows_per_shard // OPTIONS["processes"])  # the asset: one img2dataset shard per process
        base = run(baseline_cmd(run_dir / "urls.txt", base_out, OPTIONS, per_shard), run_dir / "baseline.log", env)
        base.update(count_baseline(base_out, "jpg"))
        print(f"  {'img2dataset':<16} {base['wall_s']:8.1f} s wall {base['cpu_s']:8.1f} s CPU  peak RSS "
              f"{base['peak_rss_mib']:7.0f} MiB  ({base['successes']:,} stored)", flush=True)
        shutil.rmtree(base_out, ignore_errors=True)
        figures["baseline"] = base

        print("ours: every stage through `dagster asset materialize`", flush=True)
        stages: dict[str, dict] = {}
        stages["ingest"] = dagster(env, run_dir, "ingest", "raw_cc3m",
                                   {"ops": {"raw_cc3m": {"config": {"paths": [str(tsv)], "rows_per_shard": a.rows_per_shard}}}})
        image_cfg = {"allow_loopback": True, "image_size": OPTIONS["image_size"], "processes": OPTIONS["processes"],
                     "threads": OPTIONS["threads"], "timeout_s": OPTIONS["timeout"], "retries": OPTIONS["retries"],
                     "parallel_shards": a.parallel_shards}
        stages["fetch"] = dagster(env, run_dir, "fetch", "images_cc3m", {"ops": {"images_cc3m": {"config": image_cfg}}}, keys)
        fetched = len(server.paths)
        if a.fetch_only:
            print(f"\nfetch (parallel_shards {a.parallel_shards}): ours {stages['fetch']['wall_s']:.1f} s vs bare "
                  f"img2dataset {base['wall_s']:.1f} s: ratio {stages['fetch']['wall_s'] / base['wall_s']:.2f}x; CPU "
                  f"beyond the download {(stages['fetch']['cpu_s'] - base['cpu_s']) / n * 1000:.2f} ms/image")
            if a.json:
                a.json.write_text(json.dumps({**figures, "stages": stages}, indent=1))
            return
        stages["captions"] = dagster(env, run_dir, "captions", "captions_cc3m", None, keys)
        stages["media_hashes"] = dagster(env, run_dir, "media_hashes", "media_hashes")
        stages["captions_dedup"] = dagster(env, run_dir, "captions_dedup", "captions_dedup")

        from mllm_pipeline.demo.tokenizer import train_tokenizer

        tok = train_tokenizer([_caption(i) for i in range(0, n, max(1, n // 5000))], run_dir / "tokenizer", vocab_size=2000)
        stages["manifests"] = dagster(env, run_dir, "manifests", "manifests",
                                      {"ops": {"manifests": {"config": {"tokenizer": str(tok), "hd_num": 1, "max_seq_len": 2048}}}})
        stages["export_media"] = dagster(env, run_dir, "export_media", "export_media")
        stages["exports"] = dagster(env, run_dir, "exports", "export_videochat2,export_ixc2,export_internvl,export_llava")

        print("Dagster's own cost", flush=True)
        noop = dagster(env, run_dir, "fetch_up_to_date", "images_cc3m", {"ops": {"images_cc3m": {"config": image_cfg}}}, keys)
        assert len(server.paths) == fetched, "an up-to-date range fetched again"
        noop["events"], noop["asset_events"] = events_of_last_run(home)
        startup = run([sys.executable, "-c", "import mllm_pipeline.definitions"], run_dir / "startup.log", env)
        figures["stages"], figures["noop_fetch"], figures["startup"] = stages, noop, startup
        if a.also_parallel > 1:
            print(f"the fetch again (force: true) with parallel_shards {a.also_parallel}", flush=True)
            again = {**image_cfg, "force": True, "parallel_shards": a.also_parallel}
            figures["fetch_parallel"] = dagster(env, run_dir, f"fetch_parallel{a.also_parallel}", "images_cc3m",
                                                {"ops": {"images_cc3m": {"config": again}}}, keys)

    from mllm_pipeline.storage import Storage

    st = Storage(str(root))
    stored = sum(st.read_manifest(f"media/cc3m/shard-{i:05d}")["summary"]["succeeded"] for i in range(shards))
    figures["stored"] = stored

    print()
    print(f"fetch: ours {stages['fetch']['wall_s']:.1f} s vs bare img2dataset {base['wall_s']:.1f} s: "
          f"ratio {stages['fetch']['wall_s'] / base['wall_s']:.2f}x (goal <= {RATIO_GOAL}); stored {stored:,} vs "
          f"{base['successes']:,}")
    if "fetch_parallel" in figures:
        fp = figures["fetch_parallel"]
        print(f"fetch with parallel_shards {a.also_parallel}: {fp['wall_s']:.1f} s: ratio {fp['wall_s'] / base['wall_s']:.2f}x")
    extra = (stages["fetch"]["cpu_s"] - base["cpu_s"]) / n
    print(f"fetch CPU beyond the download: {extra * 1000:.2f} ms/image "
          f"({stages['fetch']['cpu_s']:.0f} s vs {base['cpu_s']:.0f} s)")
    per_partition = (noop["wall_s"] - startup["wall_s"]) / shards
    print(f"Dagster per run: CLI start-up and definitions {startup['wall_s']:.1f} s; an up-to-date range of {shards} "
          f"partition(s) {noop['wall_s']:.1f} s ({noop['events']} events, {noop['asset_events']} asset events): "
          f"{per_partition:.2f} s per partition beyond start-up")
    print()
    fixed = noop["cpu_s"]  # a run's own cost: CLI, definitions, step and check processes, events, skip checks
    print(f"{'stage':<16} {'wall s':>8} {'CPU s':>8} {'CPU ms/img':>10} {'peak MiB':>9} {'CC3M 3.3M: CPU h':>17} "
          f"{'WebVid 10.7M: CPU h':>20}")
    per_image: dict[str, float] = {}
    for name, r in stages.items():
        cpu = r["cpu_s"] - (base["cpu_s"] if name == "fetch" else fixed)
        per = max(0.0, cpu) / n
        per_image[name] = per
        webvid = "" if name in ("fetch", "media_hashes", "export_media") else f"{per * WEBVID_CLIPS / 3600:20.1f}"
        print(f"{name:<16} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {per * 1000:10.2f} {r['peak_rss_mib']:9.0f} "
              f"{per * CC3M_IMAGES / 3600:17.1f} {webvid:>20}")
    figures["cpu_s_per_image"] = per_image
    print(f"(CPU ms/img: fetch beyond the bare img2dataset's CPU; the other stages beyond a run's fixed cost, "
          f"{fixed:.1f} CPU s = the up-to-date range run. WebVid left blank where the cost is per medium, measured "
          "here for images only)")
    print()
    print("peak RSS of the unpartitioned stages; upper bounds at full size: everything above the start-up RSS "
          f"({startup['peak_rss_mib']:.0f} MiB) taken to grow with the rows (run a second --images to fit a line):")
    for name in ("media_hashes", "captions_dedup", "manifests", "export_media", "exports"):
        r = stages[name]
        slope = max(0.0, r["peak_rss_mib"] - startup["peak_rss_mib"]) / n
        print(f"  {name:<16} {r['peak_rss_mib']:7.0f} MiB at {n:,}; ~{(startup['peak_rss_mib'] + slope * CC3M_IMAGES) / 1024:5.1f} "
              f"GiB at 3.3M, ~{(startup['peak_rss_mib'] + slope * WEBVID_CLIPS) / 1024:5.1f} GiB at 10.7M rows")
    total = sum(r["wall_s"] for r in stages.values())
    ratio = total / base["wall_s"]
    figures["end_to_end"] = {"wall_s": total, "ratio": ratio}
    print(f"\nend to end (ours, every stage one after the other): {total / 60:.1f} min wall for {n:,} images, "
          f"{ratio:.2f}x the download alone (bare img2dataset, {base['wall_s']:.1f} s)")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
