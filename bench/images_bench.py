"""Benchmark: image downloads through the images_cc3m asset against the bare img2dataset CLI, same URLs, same run.

    .venv/bin/python bench/images_bench.py                      # 2,000 images, 3 repeats of each contender
    .venv/bin/python bench/images_bench.py --images 300 --repeats 1   # a quick check

What it does (see bench/README.md for the figures):

1. Generates, once, ``--images`` distinct JPEGs of varied size (each side 300-1200 px; smooth colour fields, shapes
   and sensor-like noise, so they compress like photos) into the workdir (default ``bench/out/``, git-ignored). A
   ``.json`` sidecar records the count, bytes and seed; the set is reused while the sidecar matches.
2. Serves them from a threaded HTTP server on loopback (``mllm_pipeline_tests.media_server``, a thread of this parent
   process) and writes the same URL list twice: ``urls.txt`` for img2dataset and a CC3M-format TSV
   (``caption<TAB>url``) for the raw asset.
3. For ``--repeats`` rounds runs, alternately, each in a fresh child process:

   * ``baseline``: the bare ``img2dataset`` CLI (``--input_format txt --output_format webdataset`` with the image
     size, resize mode, encode format and quality, processes, threads, timeout, retries, shard size, hash and
     header-directive settings the asset passes);
   * ``ours``: ``dagster.materialize`` of the ``images_cc3m`` asset, partition ``shard-00000``, over a raw shard of
     the same URLs (made beforehand, untimed, by materializing ``raw_cc3m`` from the TSV into a fresh storage root
     and an ephemeral Dagster instance), with ``allow_loopback: true`` and the same img2dataset options. This
     includes the guard proxy, the decode check of every image, the rewrite into the media shard's tar, the
     status table, the manifest commit and Dagster's run overhead.

   The baseline's time is the wall time of the CLI process (interpreter start and imports included; they take
   about 1.7 s, of which ``import img2dataset`` is almost all, and "ours" pays the same import inside its run).
   The time of "ours" is measured in the child around ``materialize`` (the Dagster imports are excluded). Before
   each run the benchmark waits for an idle CPU (``--wait-idle``); a run during which other processes used more
   than 0.15 cores (this process's server thread is not counted) is measured again, up to ``--retries`` times.
4. Prints a per-run log and a summary: per contender the median and the best seconds, images/s and successes;
   the ratio of ours/baseline throughput (target >= 0.9) and whether both stored the same number of images.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GEN_VERSION = 1
TARGET = 0.95
GUARD_TARGET_MS = 0.3
OTHER_LOAD_LIMIT = 0.15

# the images_cc3m asset's defaults (ImageShardConfig); both contenders get these values explicitly
ASSET_DEFAULTS = {"image_size": 1680, "resize_mode": "keep_ratio_largest", "resize_only_if_bigger": True,
                  "encode_format": "jpg", "encode_quality": 95, "processes": 2, "threads": 32, "timeout": 10,
                  "retries": 1}


# --------------------------------------------------------------------------------------------------------------
# helpers shared with videos_bench.py (machine load, child processes, summaries)
# --------------------------------------------------------------------------------------------------------------

def cpu_busy_seconds() -> float:
    """CPU time used by everything on the machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_idle(max_wait: float, threshold: float = 0.2, idle_for: int = 3) -> float:
    """Wait (up to max_wait s) until the other processes have used less than ``threshold`` cores for ``idle_for``
    consecutive seconds (this process's own CPU, i.e. the media server, is not counted); returns the seconds waited.

    A short random pause first, so that two benchmarks waiting for the same idle moment do not start together."""
    t0 = time.perf_counter()
    time.sleep(random.uniform(0.0, 2.0))
    told = False
    quiet = 0
    while True:
        b0, s0 = cpu_busy_seconds(), self_cpu_seconds()
        time.sleep(1.0)
        load = (cpu_busy_seconds() - b0) - (self_cpu_seconds() - s0)
        quiet = quiet + 1 if load < threshold else 0
        waited = time.perf_counter() - t0
        if quiet >= idle_for or waited >= max_wait:
            if told:
                print(f"    ... machine {'idle' if quiet >= idle_for else 'still busy'} after {waited:.0f}s", flush=True)
            return waited
        if load >= threshold and not told:
            print(f"    (other processes are using {load:.1f} cores; waiting up to {max_wait:.0f}s for an idle machine)", flush=True)
            told = True
        if load >= threshold:
            time.sleep(random.uniform(2.0, 5.0))


def run_child(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict:
    """Run one contender's child process; returns its wall time, its CPU time (with its reaped descendants, from
    os.wait4) and the cores other processes used meanwhile (this parent's own CPU, i.e. the media server, excluded)."""
    busy0, self0 = cpu_busy_seconds(), self_cpu_seconds()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    busy = cpu_busy_seconds() - busy0
    parent = self_cpu_seconds() - self0
    child_cpu = ru.ru_utime + ru.ru_stime
    return {"rc": os.waitstatus_to_exitcode(status), "process_seconds": wall, "child_cpu_seconds": child_cpu,
            "server_cpu_seconds": parent, "other_load_cores": max(0.0, busy - child_cpu - parent) / wall}


def work_cpu() -> float:
    """CPU seconds of this process plus its reaped children (img2dataset's / video2dataset's worker processes)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without proxy settings (the bare CLI talks to the server directly)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env.update(extra or {})
    return env


def measure_repeats(contenders: dict, repeats: int, wait_s: float, retries: int, one_run) -> dict[str, list[dict]]:
    """Alternate the contenders ``repeats`` times; ``one_run(name) -> dict`` with seconds, successes, other_load_cores."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for rep in range(repeats):
        order = list(contenders) if rep % 2 == 0 else list(contenders)[::-1]  # ABBA: neither always goes first
        for name in order:
            for attempt in range(retries + 1):
                waited = wait_idle(wait_s)
                info = one_run(name)
                info["waited_s"] = waited
                if info["other_load_cores"] <= OTHER_LOAD_LIMIT or attempt == retries:
                    break
                print(f"  [{rep + 1}/{repeats}] {name:<8} {info['seconds']:7.1f}s  CONTENDED (other processes used "
                      f"{info['other_load_cores']:.2f} cores meanwhile): measuring again", flush=True)
            runs[name].append(info)
            flag = f"  CONTENDED: other processes used {info['other_load_cores']:.2f} cores" if info["other_load_cores"] > OTHER_LOAD_LIMIT else ""
            print(f"  [{rep + 1}/{repeats}] {name:<8} {info['seconds']:7.1f}s  {info['items'] / info['seconds']:7.1f} {info['unit']}/s  "
                  f"successes {info['successes']:,}/{info['items']:,}  cpu {info['cpu_seconds']:6.1f}s  "
                  f"(server thread {info['server_cpu_seconds']:.1f}s, others {info['other_load_cores']:.2f} cores){flag}"
                  f"{info.get('note', '')}", flush=True)
    return runs


def summarize(runs: dict[str, list[dict]], target: float, unit: str) -> dict:
    """Median and best per contender, the throughput ratio ours/baseline and the success check; prints a table."""
    out = {}
    print(f"\nsummary ({len(runs['baseline'])} run(s) each; throughput = {unit} attempted / seconds; "
          f"target: ours/baseline throughput >= {target})\n")
    hdr = f"{'contender':<9} {'median s':>9} {'best s':>7} {'median ' + unit + '/s':>14} {'best ' + unit + '/s':>12} {'cpu s':>6}  successes"
    print(hdr)
    print("-" * len(hdr))
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        items = rs[0]["items"]
        succ = sorted({r["successes"] for r in rs})
        out[name] = {"median_s": statistics.median(secs), "best_s": min(secs), "items": items, "successes": succ,
                     "median_cpu_s": statistics.median(r["cpu_seconds"] for r in rs)}
        print(f"{name:<9} {out[name]['median_s']:>9.2f} {min(secs):>7.2f} {items / out[name]['median_s']:>14.1f} "
              f"{items / min(secs):>12.1f} {out[name]['median_cpu_s']:>6.1f}  {', '.join(f'{s:,}' for s in succ)} of {items:,}")
    b, o = out["baseline"], out["ours"]
    ratio_median = b["median_s"] / o["median_s"]
    ratio_best = b["best_s"] / o["best_s"]
    per_repeat = [rb["seconds"] / ro["seconds"] for rb, ro in zip(runs["baseline"], runs["ours"])]
    same = b["successes"] == o["successes"] and len(b["successes"]) == 1
    print(f"\nratio ours/baseline throughput: median {ratio_median:.2f}, best-of {ratio_best:.2f} "
          f"(per repeat {', '.join(f'{x:.2f}' for x in per_repeat)}) -> target {'met' if ratio_median >= target else 'MISSED'}")
    print(f"successes: baseline {', '.join(map(str, b['successes']))}, ours {', '.join(map(str, o['successes']))} -> "
          f"{'the same' if same else 'DIFFERENT'}")
    contended = [r for rs in runs.values() for r in rs if r["other_load_cores"] > OTHER_LOAD_LIMIT]
    if contended:
        print(f"WARNING: {len(contended)} run(s) shared the CPUs with other processes (up to "
              f"{max(r['other_load_cores'] for r in contended):.2f} cores); their times are not reliable.")
    return {"contenders": out, "ratio_median": ratio_median, "ratio_best": ratio_best, "per_repeat": per_repeat,
            "same_successes": same, "contended_runs": len(contended)}


def git_state() -> str:
    def git(*a):
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--", "mllm_pipeline/download", "mllm_pipeline/defs/media")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in mllm_pipeline/download or defs/media" if dirty and dirty != "?" else "")


def header(title: str, workdir: Path) -> dt.datetime:
    started = dt.datetime.now().astimezone()
    print(f"{title}, {started:%Y-%m-%d %H:%M %Z}; {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python {platform.python_version()}; "
          f"workdir {workdir}; code under test: git {git_state()}", flush=True)
    return started


def sidecar_ok(path: Path, want: dict) -> bool:
    if not path.exists():
        return False
    meta = json.loads(path.read_text())
    return all(meta.get(k) == v for k, v in want.items())


def asset_child_setup(root: Path, raw_asset_name: str, raw_config: dict):
    """In a child: an ephemeral Dagster instance with the raw asset materialized (registers partition shard-00000)."""
    import dagster as dg

    from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
    from mllm_pipeline.defs.resources import StorageResource

    instance = dg.DagsterInstance.ephemeral()
    resources = {"storage": StorageResource(root=str(root))}
    raw = next(a for a in RAW_ASSETS if a.key.to_user_string() == raw_asset_name)
    r = dg.materialize([raw], instance=instance, resources=resources,
                       run_config={"ops": {raw_asset_name: {"config": raw_config}}})
    assert r.success
    return dg, instance, resources


# --------------------------------------------------------------------------------------------------------------
# images: generation, and the two contenders (children)
# --------------------------------------------------------------------------------------------------------------

def generate_images(dest: Path, count: int, seed: int = 11) -> dict:
    """``count`` distinct JPEGs, each side 300-1200 px, that compress like photographs."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        w, h = (int(x) for x in rng.integers(300, 1201, 2))
        small = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(5, 25))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
        noise = rng.normal(0, float(rng.uniform(2, 8)), (h, w, 1))
        arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path = dest / f"{i:05d}.jpg"
        Image.fromarray(arr).save(path, "JPEG", quality=int(rng.integers(80, 93)))
        total += path.stat().st_size
    return {"count": count, "bytes": total, "seed": seed}


def ensure_images(workdir: Path, count: int) -> tuple[Path, dict]:
    root = workdir / f"images-{count}"
    meta_path = workdir / f"images-{count}.json"
    if not sidecar_ok(meta_path, {"gen_version": GEN_VERSION, "count": count}) or len(list((root / "img").glob("*.jpg"))) != count:
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {count:,} JPEGs into {root} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate", str(count), "--out", str(root / "img"),
                        "--result", str(meta_path)], check=True)
        meta = json.loads(meta_path.read_text())
        print(f"generated {count:,} JPEGs, {meta['bytes'] / 2**20:.0f} MiB, in {time.perf_counter() - t0:.0f}s", flush=True)
    meta = json.loads(meta_path.read_text())
    return root, meta


def child_generate(count: int, out: str, result: str) -> None:
    meta = generate_images(Path(out), count)
    meta["gen_version"] = GEN_VERSION
    Path(result).write_text(json.dumps(meta))


def baseline_cmd(urls_txt: Path, out_dir: Path, o: dict, per_shard: int) -> list[str]:
    """The bare img2dataset CLI with the options the asset passes to img2dataset.download."""
    cli = str(Path(sys.executable).with_name("img2dataset"))
    return [cli, "--url_list", str(urls_txt), "--input_format", "txt", "--output_folder", str(out_dir),
            "--output_format", "webdataset", "--image_size", str(o["image_size"]), "--resize_mode", o["resize_mode"],
            "--resize_only_if_bigger", str(o["resize_only_if_bigger"]), "--encode_format", o["encode_format"],
            "--encode_quality", str(o["encode_quality"]), "--processes_count", str(o["processes"]),
            "--thread_count", str(o["threads"]), "--timeout", str(o["timeout"]), "--retries", str(o["retries"]),
            "--number_sample_per_shard", str(per_shard), "--disable_all_reencoding", str(o["resize_mode"] == "no"),
            "--compute_hash", "None",
            "--disallowed_header_directives", json.dumps(["noai", "noimageai", "noindex", "noimageindex"]), "--incremental_mode", "incremental",
            "--enable_wandb", "False"]


def count_baseline(out_dir: Path, ext: str) -> dict:
    """Successes in an img2dataset/video2dataset output folder: from its stats files, cross-checked against the tars."""
    import tarfile

    stats = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*_stats.json"))]
    in_tars = 0
    for tar_path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            in_tars += sum(1 for m in tar if m.isfile() and m.name.endswith("." + ext))
    return {"successes": sum(s.get("successes", 0) for s in stats), "count": sum(s.get("count", 0) for s in stats),
            "in_tars": in_tars, "status_dict": {k: v for s in stats for k, v in (s.get("status_dict") or {}).items() if k != "success"}}


def child_ours_images(tsv: str, root: str, options: dict, result: str, rows: int) -> None:
    dg, instance, resources = asset_child_setup(Path(root), "raw_cc3m", {"paths": [tsv], "rows_per_shard": rows})
    from mllm_pipeline.defs.media.assets import images_cc3m
    from mllm_pipeline.stages.media import iter_shard, read_status
    from mllm_pipeline.storage import Storage

    config = {"allow_loopback": True, "image_size": options["image_size"], "resize_mode": options["resize_mode"],
              "resize_only_if_bigger": options["resize_only_if_bigger"], "encode_format": options["encode_format"],
              "encode_quality": options["encode_quality"], "processes": options["processes"],
              "threads": options["threads"], "timeout_s": options["timeout"], "retries": options["retries"],
              "guard": options.get("guard", "inline"), "guard_processes": options.get("guard_processes", 1)}
    c0, t0 = work_cpu(), time.perf_counter()
    r = dg.materialize([images_cc3m], partition_key="shard-00000", instance=instance, resources=resources,
                       run_config={"ops": {"images_cc3m": {"config": config}}})
    seconds, cpu = time.perf_counter() - t0, work_cpu() - c0
    assert r.success
    status = read_status(Storage(root), "cc3m", "shard-00000")
    ok = [s == "success" for s in status.column("status").to_pylist()]
    reasons: dict[str, int] = {}
    for s, why in zip(status.column("status").to_pylist(), status.column("reason").to_pylist()):
        if s != "success":
            reasons[why] = reasons.get(why, 0) + 1
    in_tar = sum(1 for _, files in iter_shard(Storage(root), "cc3m", "shard-00000") if options["encode_format"] in files)
    Path(result).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "successes": sum(ok), "attempted": len(ok),
                                        "in_tar": in_tar, "failed_by_reason": reasons}))


def child_baseline(cmd_json: str, result: str) -> None:
    """Run the bare CLI, timing its whole process."""
    cmd = json.loads(cmd_json)
    c0, t0 = work_cpu(), time.perf_counter()
    rc = subprocess.run(cmd).returncode
    Path(result).write_text(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": work_cpu() - c0, "rc": rc}))


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------



def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options both download benchmarks share, and the internal ones their child processes take."""
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--keep", action="store_true", help="keep the last run's outputs in the workdir")
    ap.add_argument("--wait-idle", type=float, default=300, metavar="S",
                    help="before each run, wait up to S seconds for other processes to leave the CPUs idle (default 300)")
    ap.add_argument("--retries", type=int, default=2, help="measure a run again if other processes used the CPUs meanwhile")
    for name in ("--cmd", "--root", "--options", "--out", "--result"):  # internal: child processes
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=int, help=argparse.SUPPRESS)

def finish_run(info: dict, name: str, result: Path, out_dir: Path, ext: str, unit: str, items: int, keep: bool) -> None:
    """Fold a child's result file into ``info``: successes, what the tars hold, failures; then drop its output."""
    info.update(json.loads(result.read_text()))
    if name == "baseline":
        c = count_baseline(out_dir / "wds", ext)
        info.update(c)
        info["note"] = "" if c["in_tars"] == c["successes"] else f"  (tars hold {c['in_tars']} {unit})"
        if c["status_dict"]:
            info["note"] += f"  failures {c['status_dict']}"
    else:
        info["note"] = "" if info["in_tar"] == info["successes"] else f"  (tar holds {info['in_tar']} {unit})"
        if info["failed_by_reason"]:
            info["note"] += f"  failures {info['failed_by_reason']}"
    info["items"], info["unit"] = items, unit
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="distinct generated JPEGs served and fetched (default 2000)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each contender, alternating (default 3)")
    ap.add_argument("--workdir", default=str(HERE / "out"), help="where the images are cached and runs write (default bench/out)")
    ap.add_argument("--image-size", type=int, default=ASSET_DEFAULTS["image_size"])
    ap.add_argument("--resize-mode", default=ASSET_DEFAULTS["resize_mode"])
    ap.add_argument("--encode-quality", type=int, default=ASSET_DEFAULTS["encode_quality"])
    ap.add_argument("--processes", type=int, default=ASSET_DEFAULTS["processes"])
    ap.add_argument("--threads", type=int, default=ASSET_DEFAULTS["threads"])
    ap.add_argument("--timeout", type=int, default=ASSET_DEFAULTS["timeout"])
    ap.add_argument("--dl-retries", type=int, default=ASSET_DEFAULTS["retries"], help="download retries per URL (both contenders)")
    ap.add_argument("--guard", choices=["inline", "proxy"], default="inline", help="the asset's guard (ours only)")
    ap.add_argument("--guard-processes", type=int, default=1, help="the asset's guard_processes (ours only; proxy)")
    ap.add_argument("--https", action="store_true",
                    help="serve the images over HTTPS with a CA made for the run, trusted by both contenders through SSL_CERT_FILE")
    add_common_args(ap)
    ap.add_argument("--tsv", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        return child_generate(args.generate, args.out, args.result)
    if args.child == "baseline":
        return child_baseline(args.cmd, args.result)
    if args.child == "ours":
        return child_ours_images(args.tsv, args.root, json.loads(args.options), args.result, args.images)

    sys.path.append(str(REPO))  # the tests' media server (mllm_pipeline_tests is not installed: the checkout's)
    from mllm_pipeline_tests.media_server import serve_directory  # standard library only

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = header("image download benchmark", workdir)
    options = {**ASSET_DEFAULTS, "image_size": args.image_size, "resize_mode": args.resize_mode,
               "encode_quality": args.encode_quality, "processes": args.processes, "threads": args.threads,
               "timeout": args.timeout, "retries": args.dl_retries, "guard": args.guard,
               "guard_processes": args.guard_processes}
    print(f"img2dataset options (both contenders): {json.dumps(options)}; {'HTTPS' if args.https else 'HTTP'}", flush=True)
    root, meta = ensure_images(workdir, args.images)
    print(f"{meta['count']:,} JPEGs, {meta['bytes'] / 2**20:.0f} MiB ({meta['bytes'] / meta['count'] / 1024:.0f} KiB each on average)", flush=True)
    for p in sorted((root / "img").glob("*.jpg")):  # warm the page cache
        p.read_bytes()

    per_shard = max(1, -(-args.images // max(1, options["processes"])))  # what the asset uses: one shard a process
    tls_env: dict[str, str] = {}
    ca = None
    if args.https:
        from mllm_pipeline.download.guard.tls_intercept import LocalCA

        ca = LocalCA("images_bench test CA")
        tls_env = ca.env(ca_only=True)
    with serve_directory(root, ssl_context=ca.server_context("127.0.0.1") if ca else None) as server:
        urls = [f"{server.base_url}/img/{i:05d}.jpg" for i in range(args.images)]
        urls_txt = workdir / "images-urls.txt"
        urls_txt.write_text("\n".join(urls) + "\n")
        tsv = workdir / "images-Train_GCC-training.tsv"
        tsv.write_text("".join(f"generated image number {i}\t{u}\n" for i, u in enumerate(urls)))
        print(f"serving them at {server.base_url}", flush=True)

        def one_run(name: str) -> dict:
            out_dir = workdir / f"run-images-{name}"
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            result = workdir / f".result-images-{name}.json"
            result.unlink(missing_ok=True)
            me = [sys.executable, str(Path(__file__).resolve())]
            if name == "baseline":
                cmd = baseline_cmd(urls_txt, out_dir / "wds", options, per_shard)
                info = run_child(me + ["--child", "baseline", "--cmd", json.dumps(cmd), "--result", str(result)],
                                 workdir / f"log-images-{name}.txt", clean_env(tls_env))
            else:
                info = run_child(me + ["--child", "ours", "--tsv", str(tsv), "--root", str(out_dir / "root"),
                                       "--options", json.dumps(options), "--images", str(args.images), "--result", str(result)],
                                 workdir / f"log-images-{name}.txt", clean_env(tls_env))
            if info["rc"] != 0 or not result.exists():
                raise SystemExit(f"{name} failed (exit status {info['rc']}); see {workdir / f'log-images-{name}.txt'}")
            if name == "ours":
                import re

                found = re.findall(r"guard CPU ([0-9.]+)s", (workdir / f"log-images-{name}.txt").read_text(errors="replace"))
                info["guard_cpu_s"] = float(found[-1]) if found else None
            finish_run(info, name, result, out_dir, options["encode_format"], "images", args.images, args.keep)
            return info

        runs = measure_repeats({"baseline": None, "ours": None}, args.repeats, args.wait_idle, args.retries, one_run)
    if ca is not None:
        ca.close()
    summary = summarize(runs, TARGET, "images")
    guard = [r["guard_cpu_s"] for r in runs["ours"] if r.get("guard_cpu_s") is not None]
    if guard:
        ms = 1000 * statistics.median(guard) / args.images
        extra = [1000 * (o["cpu_seconds"] - b["cpu_seconds"]) / args.images for o, b in zip(runs["ours"], runs["baseline"])
                 if o.get("cpu_seconds") is not None and b.get("cpu_seconds") is not None]
        print(f"{args.guard} guard CPU: {ms:.3f} ms/image (median, target <= {GUARD_TARGET_MS}); all of ours' extra CPU over the "
              f"bare CLI (Dagster run, raw shard read, decode check, tar rewrite, commit, guard): "
              f"{statistics.median(extra) if extra else float('nan'):.2f} ms/image", flush=True)
        summary["guard_cpu_ms_per_image"] = ms
    print(f"total {time.perf_counter() - T0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started.isoformat(), "cpus": os.cpu_count(), "git": git_state(),
                                               "options": options, "images": meta, "summary": summary, "runs": runs},
                                              indent=2, default=str))


T0 = time.perf_counter()

if __name__ == "__main__":
    main()
