"""Benchmark: a 20-shard range backfill of ``images_cc3m`` on a loopback server, one shard at a time against
``parallel_shards`` at a time, in the same run; wall time and CPU utilisation.

    .venv/bin/python bench/backfill_bench.py                       # 20 shards x 25 images, parallel 1 vs 4
    .venv/bin/python bench/backfill_bench.py --parallel 3 --rows 40

Each contender is one ``dagster.materialize`` of the whole range (single-run backfill: the range tags) in a fresh
child process over a fresh storage root, with ``processes: 1, threads: 8`` per shard. While it runs the parent
samples ``/proc/stat`` every 0.5 s. Reported per contender: seconds, images/s, the whole machine's CPU
utilisation (busy share of all cores, other processes included) and the contender's own utilisation (CPU seconds of
the child and its reaped descendants, i.e. img2dataset's workers, divided by wall seconds x cores). The media
server is a thread of the parent, counted separately.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def busy_total() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    v = (v + [0] * 8)[:8]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def child(root: str, tsv: str, shards: int, rows: int, parallel: int, result: str) -> None:
    import dagster as dg

    from mllm_pipeline.defs.media.assets import images_cc3m
    from mllm_pipeline.defs.resources import StorageResource
    from mllm_pipeline.sources.cc3m import ingest_cc3m
    from mllm_pipeline.storage import Storage

    storage = Storage(root)
    ingest_cc3m([tsv], storage, rows_per_shard=rows)
    keys = [f"shard-{i:05d}" for i in range(shards)]
    config = {"allow_loopback": True, "processes": 1, "threads": 8, "timeout_s": 20, "retries": 0,
              "parallel_shards": parallel}
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("cc3m_shards", keys)
        Path(result + ".start").write_text("")
        r0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = dg.materialize([images_cc3m], instance=instance, resources={"storage": StorageResource(root=root)},
                           tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
                           run_config={"ops": {"images_cc3m": {"config": config}}})
        seconds = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.success
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(r0, r1))
    ok = sum(storage.read_manifest(f"media/cc3m/{k}")["summary"]["succeeded"] for k in keys)
    Path(result).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "succeeded": ok}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25, help="images per shard")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--workdir", default=str(HERE / "out" / "backfill"))
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        root, tsv, shards, rows, parallel, result = args.child
        return child(root, tsv, int(shards), int(rows), int(parallel), result)

    import numpy as np
    from PIL import Image

    sys.path.append(str(REPO))  # the tests' media server (mllm_pipeline_tests is not installed: the checkout's)
    from mllm_pipeline_tests.media_server import serve_directory

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "www/img").mkdir(parents=True)
    n = args.shards * args.rows
    rng = np.random.default_rng(5)
    for i in range(n):  # photo-sized, noisy JPEGs (each side 300-800 px)
        w, h = (int(x) for x in rng.integers(300, 801, 2))
        base = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
        arr = np.clip(base + rng.normal(0, 6, (h, w, 1)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(work / f"www/img/{i:05d}.jpg", quality=88)
    cores = os.cpu_count() or 1
    print(f"{args.shards} shards x {args.rows} images, {cores} cores; parallel_shards 1 vs {args.parallel}", flush=True)
    results = {}
    with serve_directory(work / "www") as server:
        tsv = work / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"image {i}\t{server.base_url}/img/{i:05d}.jpg\n" for i in range(n)))
        for parallel in (1, args.parallel):
            root, result = work / f"root-{parallel}", work / f"result-{parallel}.json"
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(root), str(tsv), str(args.shards),
                                     str(args.rows), str(parallel), str(result)], cwd=REPO,
                                    stdout=open(work / f"log-{parallel}.txt", "wb"), stderr=subprocess.STDOUT)
            while not Path(str(result) + ".start").exists() and proc.poll() is None:
                time.sleep(0.05)
            samples: list[float] = []
            stop = threading.Event()

            def sample() -> None:
                b0, t0 = busy_total()
                while not stop.wait(0.5):
                    b1, t1 = busy_total()
                    samples.append((b1 - b0) / max(1e-9, t1 - t0))
                    b0, t0 = b1, t1

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            proc.wait()
            stop.set()
            th.join()
            assert proc.returncode == 0, (work / f"log-{parallel}.txt").read_text()[-3000:]
            r = json.loads(result.read_text())
            r["machine_util"] = sum(samples) / max(1, len(samples))
            r["own_util"] = r["cpu_seconds"] / (r["seconds"] * cores)
            results[parallel] = r
            print(f"parallel_shards {parallel}: {r['seconds']:.1f}s, {n / r['seconds']:.1f} images/s, "
                  f"{r['succeeded']}/{n} stored; CPU utilisation: machine {100 * r['machine_util']:.0f}% of {cores} "
                  f"cores, this run's processes {100 * r['own_util']:.0f}%", flush=True)
    a, b = results[1], results[args.parallel]
    print(f"speed-up parallel_shards {args.parallel} over 1: {a['seconds'] / b['seconds']:.2f}x; "
          f"own CPU utilisation {100 * a['own_util']:.0f}% -> {100 * b['own_util']:.0f}%", flush=True)


if __name__ == "__main__":
    main()
