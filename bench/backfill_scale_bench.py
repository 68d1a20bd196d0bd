"""Benchmark: a 1,000-partition backfill of ``images_coco`` through the real daemon, webserver and code server, on
PostgreSQL run/event storage, with a killed run worker and a code-location restart in the middle.

    .venv/bin/python bench/backfill_scale_bench.py                     # 1,000 shards x 2 images
    .venv/bin/python bench/backfill_scale_bench.py --shards 120        # quick try

What it does, in a fresh temporary folder (everything it starts is stopped at the end, by pid):

1. Writes a COCO captions file and ``shards x rows_per_shard`` small JPEGs under ``train2017/`` (media already on
   disk: the media stage adopts them, no download), starts PostgreSQL (``initdb`` / ``pg_ctl``, as the deploy tests
   do; SQLite when PostgreSQL is not installed) and a ``dagster.yaml`` that is ``docker/dagster.yaml`` itself
   (QueuedRunCoordinator, pools with ``default_limit: 1``, run monitoring, ``run_retries``); ``downloads`` is set to
   4 slots with ``dagster instance concurrency set``, as the compose daemon does.
2. Ingests with ``dagster asset materialize --select raw_coco`` (``rows_per_shard`` small), which registers one
   ``coco_shards`` partition per raw shard.
3. Starts ``dagster code-server start`` (the code location), ``dagster-daemon run`` and ``dagster-webserver`` on a
   workspace that points at the code server, and launches the backfill of every partition the way the UI's
   "Materialize" dialog does: the ``launchPartitionBackfill`` mutation with ``assetSelection`` and
   ``partitionNames``. ``images_coco`` has ``BackfillPolicy.single_run()``: the backfill is one run over the range.
4. When about half of the shards are committed (``media/coco/shard-NNNNN/_manifest.json`` in the storage root), it
   SIGKILLs the run's worker process (the pid the run logs in "Started process for run (pid: N)", checked to be
   a descendant of the code server). The daemon's ``run_retries`` retries it; if no retry comes, the backfill is
   re-executed from failure (``reexecutePartitionBackfill``, FROM_FAILURE), as the UI's button does.
5. When about three quarters are committed, it stops and restarts the webserver and the code server (SIGTERM,
   30 s, then SIGKILL of ``dagster code-server start``; its inner gRPC server stays until its runs end).
6. Waits for the backfill to end, then checks each shard's manifest (committed exactly once: versions of the shards
   committed before the kill unchanged), counts what the retry skipped as up to date and what it fetched, the
   events per partition, the storage size, the pool slots seen claimed, and times the UI's GraphQL queries
   (asset page, backfill page, backfills list, runs list) against the webserver. The query documents are taken
   from the installed webserver's bundle (its source maps), so they are the UI's own.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
ASSET = "images_coco"
DATASET = "coco"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- inputs ------------------------------------------------------------------------------------------------------


def make_coco(base: Path, n_images: int) -> Path:
    from mllm_pipeline_tests.download.conftest import make_jpeg

    images, anns = [], []
    folder = base / "train2017"
    for i in range(n_images):
        name = f"{i + 1:012d}.jpg"
        make_jpeg(folder / name, 64, 48, seed=i)
        images.append({"id": i + 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                       "width": 64, "height": 48})
        anns.append({"image_id": i + 1, "id": i + 1, "caption": f"A picture number {i} of a small coloured box."})
    ann = base / "annotations" / "captions_train2017.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    return ann


# -- processes ---------------------------------------------------------------------------------------------------


class Procs:
    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.logs,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def stop(self, name: str, timeout: float = 30) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def children_of(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for d in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(d).read_text().rsplit(")", 1)[1].split()
            parent[int(d.split("/")[2])] = int(fields[1])
        except (OSError, IndexError, ValueError):
            pass
    out, frontier = set(), {pid}
    while frontier:
        nxt = {c for c, p in parent.items() if p in frontier and c not in out}
        out |= nxt
        frontier = nxt
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    st = Path(f"/proc/{pid}/stat")
    return not (st.exists() and st.read_text().rsplit(")", 1)[1].split()[0] == "Z")


# -- GraphQL -----------------------------------------------------------------------------------------------------


def ui_queries() -> dict[str, str]:
    """The UI's GraphQL documents (query + the fragments it spreads), from the installed webapp's source maps."""
    import dagster_webserver

    chunks = Path(dagster_webserver.__file__).parent / "webapp" / "build" / "_next" / "static" / "chunks"
    defs: dict[str, str] = {}
    for f in chunks.glob("*.js.map"):
        m = json.loads(f.read_text())
        for content in m.get("sourcesContent") or []:
            if not content or "gql`" not in content:
                continue
            for body in re.findall(r"gql`(.*?)`", content, re.S):
                body = re.sub(r"\$\{\w+\}", "", body)
                for part in re.split(r"(?m)^(?=\s*(?:query|fragment|mutation|subscription) \w+)", body):
                    mm = re.match(r"\s*(query|fragment|mutation|subscription) (\w+)", part)
                    if mm:
                        defs.setdefault(mm.group(2), part.strip())

    def doc(name: str) -> str:
        out, seen, i = [name], {name}, 0
        while i < len(out):
            for s in re.findall(r"\.\.\.(\w+)", defs[out[i]]):
                if s in defs and s not in seen:
                    seen.add(s)
                    out.append(s)
            i += 1
        return "\n\n".join(defs[n] for n in out)

    return {n: doc(n) for n in defs if not n.endswith("Fragment")}


def gql(port: int, query: str, variables: dict, timeout: float = 120) -> tuple[dict, float]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = json.loads(r.read())
    return body, (time.perf_counter() - t0) * 1000


def wait_http(port: int, deadline_s: float = 300) -> float:
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                return time.time() - t0
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"webserver on {port} did not answer in {deadline_s}s")


def wait_grpc(port: int, env: dict, deadline_s: float = 300) -> float:
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        r = subprocess.run([str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)], env=env,
                           capture_output=True)
        if r.returncode == 0:
            return time.time() - t0
        time.sleep(1)
    raise RuntimeError(f"code server on {port} did not answer in {deadline_s}s")


LAUNCH = """mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""

REEXECUTE = """mutation ReexecuteBackfill($reexecutionParams: ReexecutionParams!) {
  reexecutePartitionBackfill(reexecutionParams: $reexecutionParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""


# -- storage -----------------------------------------------------------------------------------------------------


def manifests(root: Path) -> dict[str, str]:
    out = {}
    for p in (root / "media" / DATASET).glob("shard-*/_manifest.json"):
        with contextlib.suppress(OSError, ValueError):
            out[p.parent.name] = json.loads(p.read_text()).get("version")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--rows-per-shard", type=int, default=2)
    ap.add_argument("--kill-at", type=float, default=0.5, help="share of shards committed when the worker is killed")
    ap.add_argument("--restart-at", type=float, default=0.75, help="share committed when the code location restarts")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of each GraphQL query")
    ap.add_argument("--extra-runs", type=int, default=12, help="single-shard backfills launched after the big one")
    ap.add_argument("--extra-timeout", type=float, default=600, help="seconds the extra runs may take")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds the backfill may take")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what was started on the way out
    t_all = time.time()
    base = Path(tempfile.mkdtemp(prefix="mllm-bfscale-"))
    os.chmod(base, 0o755)
    figures: dict[str, object] = {"shards": args.shards, "rows_per_shard": args.rows_per_shard}
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, base, True)
        from mllm_pipeline_tests.deploy.conftest import postgres_bindir, postgres_server

        home, storage, logs = base / "home", base / "storage", base / "logs"
        for d in (home, storage, logs):
            d.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "MLLM_"))}
        env.update(DAGSTER_HOME=str(home), MLLM_STORAGE_ROOT=str(storage), PYTHONPATH=str(REPO))
        instance_yaml = (REPO / "docker" / "dagster.yaml").read_text()
        if postgres_bindir():
            pg = stack.enter_context(postgres_server())
            env.update(pg.env())
            figures["storage_backend"] = "postgresql"
        else:
            instance_yaml = re.sub(r"(?ms)^storage:\n(  .*\n|\s*#.*\n)+", "", instance_yaml)
            figures["storage_backend"] = "sqlite (PostgreSQL not installed)"
            pg = None
        (home / "dagster.yaml").write_text(instance_yaml)
        log(f"storage: {figures['storage_backend']}; folder {base}")

        n_images = args.shards * args.rows_per_shard
        t0 = time.time()
        ann = make_coco(base / "coco", n_images)
        figures["inputs_s"] = round(time.time() - t0, 1)

        def cli(*a: str, check: bool = True) -> subprocess.CompletedProcess:
            r = subprocess.run([str(BIN / "dagster"), *a], env=env, capture_output=True, text=True, cwd=base)
            if check and r.returncode != 0:
                raise RuntimeError(f"dagster {' '.join(a)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            return r

        cfg = base / "ingest.yaml"
        cfg.write_text(json.dumps({"ops": {"raw_coco": {"config": {
            "paths": [str(ann)], "images_dir": str(base / "coco"), "rows_per_shard": args.rows_per_shard}}}}))
        t0 = time.time()
        cli("asset", "materialize", "-m", "mllm_pipeline.definitions", "--select", "raw_coco", "-c", str(cfg))
        figures["ingest_s"] = round(time.time() - t0, 1)
        cli("instance", "concurrency", "set", "downloads", "4")

        import dagster as dg

        os.environ.update(env)
        instance = stack.enter_context(dg.DagsterInstance.get())
        keys = instance.get_dynamic_partitions(f"{DATASET}_shards")
        figures["partitions_registered"] = len(keys)
        log(f"ingest {figures['ingest_s']}s, {len(keys)} partitions registered")

        code_port, web_port = free_port(), free_port()
        ws = base / "workspace.yaml"
        ws.write_text(f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {code_port}\n"
                      f"      location_name: mllm_pipeline\n")
        procs = Procs(env, logs)
        stack.callback(procs.stop_all)

        def start_code() -> float:
            procs.start("code", [str(BIN / "dagster"), "code-server", "start", "-m", "mllm_pipeline.definitions",
                                 "-h", "127.0.0.1", "-p", str(code_port), "--location-name", "mllm_pipeline"])
            return wait_grpc(code_port, env)

        def start_web() -> float:
            procs.start("web", [str(BIN / "dagster-webserver"), "-w", str(ws), "-h", "127.0.0.1",
                                "-p", str(web_port)])
            return wait_http(web_port)

        t0 = time.time()
        start_code()
        procs.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(ws)])
        start_web()
        figures["services_start_s"] = round(time.time() - t0, 1)
        log(f"code server, daemon and webserver up in {figures['services_start_s']}s")

        queries = ui_queries()
        t_launch = time.time()
        body, ms = gql(web_port, LAUNCH, {"backfillParams": {
            "assetSelection": [{"path": [ASSET]}], "partitionNames": keys, "fromFailure": False, "tags": []}})
        res = body.get("data", {}).get("launchPartitionBackfill") or {}
        if res.get("__typename") != "LaunchBackfillSuccess":
            raise RuntimeError(f"launch failed: {body}")
        backfill_id = res["backfillId"]
        figures["launch_mutation_ms"] = round(ms)
        log(f"backfill {backfill_id} launched ({ms:.0f} ms)")

        from dagster._core.execution.backfill import BulkActionStatus
        from dagster._core.storage.dagster_run import RunsFilter

        def backfill_runs():
            return instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": backfill_id}))

        killed = restarted = reexecuted = False
        committed_at_kill: dict[str, str] = {}
        max_claimed, slot_samples = 0, []
        first_run_start = None
        kill_info: dict[str, object] = {}
        restart_info: dict[str, object] = {}
        status = None
        statuses: list = []
        while time.time() - t_launch < args.timeout:
            time.sleep(2)
            done = manifests(storage)
            try:
                info = instance.event_log_storage.get_concurrency_info("downloads")
                claimed = len(getattr(info, "claimed_slots", []) or [])
                max_claimed = max(max_claimed, claimed)
                slot_samples.append(claimed)
            except Exception:  # noqa: BLE001 -- an older storage without pools
                pass
            runs = backfill_runs()
            if first_run_start is None:
                started = [instance.get_run_record_by_id(r.run_id) for r in runs]
                starts = [s.start_time for s in started if s and s.start_time]
                if starts:
                    first_run_start = min(starts)
                    figures["launch_to_run_start_s"] = round(first_run_start - t_launch, 1)
            if not killed and len(done) >= args.kill_at * len(keys):
                running = [r for r in runs if r.status == dg.DagsterRunStatus.STARTED]
                if running:
                    run = running[0]
                    pid = None
                    for rec in instance.all_logs(run.run_id):
                        m = re.search(r"Started process for run \(pid: (\d+)\)", rec.message or "")
                        if m:
                            pid = int(m.group(1))
                    code_pid = procs.procs["code"].pid
                    in_tree = pid in children_of(code_pid) if pid else False
                    # the run worker and what it started (the step process of the multiprocess executor): a
                    # crash of the worker's machine or container takes them all; the worker alone would leave its
                    # step process committing shards under a run already marked failed
                    tree = [pid, *sorted(children_of(pid))]
                    committed_at_kill = manifests(storage)
                    for p in tree:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
                    killed = True
                    t_kill = time.time()
                    kill_info = {"run": run.run_id, "pid": pid, "descendant_of_code_server": in_tree,
                                 "processes_killed": len(tree),
                                 "committed_at_kill": len(committed_at_kill)}
                    log(f"SIGKILL run worker pid {pid} of run {run.run_id[:8]} with {len(committed_at_kill)} "
                        f"shards committed (descendant of the code server: {in_tree})")
            if killed and not reexecuted and "failed_after_s" not in kill_info:
                r0 = instance.get_run_by_id(kill_info["run"])
                if r0 and r0.status == dg.DagsterRunStatus.FAILURE:
                    kill_info["failed_after_s"] = round(time.time() - t_kill, 1)
            if killed and not restarted and len(done) >= args.restart_at * len(keys):
                running = [r for r in backfill_runs() if r.status == dg.DagsterRunStatus.STARTED]
                workers = children_of(procs.procs["code"].pid)
                t0 = time.time()
                procs.stop("web")
                procs.stop("code")
                stopped = time.time() - t0
                code_s = start_code()
                web_s = start_web()
                restart_info = {"down_s": round(time.time() - t0, 1), "stop_s": round(stopped, 1),
                                "code_ready_s": round(code_s, 1), "web_ready_s": round(web_s, 1),
                                "runs_in_flight": len(running),
                                "worker_processes_surviving": sum(alive(p) for p in workers),
                                "worker_processes_before": len(workers), "committed_at_restart": len(done)}
                restarted = True
                log(f"restarted webserver and code server: {restart_info}")
            bf = instance.get_backfill(backfill_id)
            if bf.status != status:
                statuses.append((round(time.time() - t_launch, 1), bf.status.value))
                log(f"backfill {bf.status.value}")
            status = bf.status
            if status not in (BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING, BulkActionStatus.FAILING):
                active = [r for r in backfill_runs() if not r.is_finished]
                if active:
                    continue
                if killed and not reexecuted and len(manifests(storage)) < len(keys):
                    # the daemon did not retry the killed run: re-execute the backfill from failure, as the
                    # backfill page's "Re-execute" menu does
                    log("no automatic retry; re-executing the backfill from failure")
                    body, _ = gql(web_port, REEXECUTE, {"reexecutionParams": {"parentRunId": backfill_id,
                                                                              "strategy": "FROM_FAILURE"}})
                    kill_info["reexecute"] = body
                    new = (body.get("data") or {}).get("reexecutePartitionBackfill") or {}
                    if not new.get("backfillId"):
                        raise RuntimeError(f"re-execution failed: {body}")
                    kill_info["first_backfill"] = backfill_id
                    kill_info["first_backfill_status"] = status.value
                    backfill_id = new["backfillId"]
                    reexecuted = True
                    status = None
                    continue
                break
        t_end = time.time()
        figures["backfill_status"] = status.value if status else None
        figures["backfill_wall_s"] = round(t_end - t_launch, 1)
        figures["backfill_statuses"] = statuses
        figures["kill"] = kill_info
        figures["restart"] = restart_info
        log(f"backfill {figures['backfill_status']} after {figures['backfill_wall_s']}s")

        # -- what the runs did ------------------------------------------------------------------------------------
        all_ids = {backfill_id, kill_info.get("first_backfill")}
        runs = []
        for bid in {i for i in all_ids if i}:
            runs += list(instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": bid})))
        runs += [r for r in instance.get_runs() if r.run_id not in {x.run_id for x in runs}
                 and r.tags.get("dagster/parent_run_id") in {x.run_id for x in runs}]
        runs.sort(key=lambda r: instance.get_run_record_by_id(r.run_id).create_timestamp)
        figures["backfill_ids"] = sorted(i for i in all_ids if i)
        per_run, total_events, by_type = [], 0, {}
        final = manifests(storage)
        for r in runs:
            rec = instance.get_run_record_by_id(r.run_id)
            records = instance.all_logs(r.run_id)
            total_events += len(records)
            committed = skipped = 0
            shard_s = 0.0
            for e in records:
                t = e.dagster_event.event_type_value if e.dagster_event else "LOG"
                by_type[t] = by_type.get(t, 0) + 1
                m = re.search(r"progress: \d+/\d+ shard\(s\) done; (shard-\d+) (committed|skipped \(([^)]*)\)).*in "
                              r"([\d.]+)s", e.user_message or "")
                if m:
                    if m.group(2) == "committed":
                        committed += 1
                    elif m.group(3) == "up to date":
                        skipped += 1
                    shard_s += float(m.group(4))
            dur = (rec.end_time or t_end) - (rec.start_time or rec.create_timestamp.timestamp())
            per_run.append({"run": r.run_id[:8], "status": r.status.value, "partitions": len(keys)
                            if r.tags.get("dagster/asset_partition_range_start") else 1,
                            "parent": (r.tags.get("dagster/parent_run_id") or "")[:8],
                            "retry_number": r.tags.get("dagster/retry_number"), "committed": committed,
                            "skipped_up_to_date": skipped, "events": len(records), "run_s": round(dur, 1),
                            "s_per_committed_shard": round(dur / committed, 3) if committed else None,
                            "queued_to_start_s": round(rec.start_time - rec.create_timestamp.timestamp(), 1)
                            if rec.start_time else None})
        figures["runs"] = per_run
        figures["events_total"] = total_events
        figures["events_per_partition"] = round(total_events / max(1, len(keys)), 2)
        figures["events_by_type"] = dict(sorted(by_type.items(), key=lambda kv: -kv[1]))
        unchanged = sum(1 for k, v in committed_at_kill.items() if final.get(k) == v)
        figures["shards_committed_final"] = len(final)
        figures["committed_before_kill_unchanged"] = f"{unchanged}/{len(committed_at_kill)}"
        retry_runs = per_run[1:]
        skipped_by_retry = retry_runs[-1]["skipped_up_to_date"] if retry_runs else 0
        refetched_by_retry = sum(x["committed"] for x in retry_runs)
        figures["first_run_commit_log_lines"] = per_run[0]["committed"] if per_run else 0
        figures["retry_skipped_up_to_date"] = skipped_by_retry
        figures["retry_fetched"] = refetched_by_retry
        # exactly once: every shard has a manifest, the ones seen before the kill kept their version, and the retry
        # fetched exactly the shards it did not find committed
        figures["every_shard_committed_once"] = len(final) == len(keys) and unchanged == len(committed_at_kill) \
            and (not retry_runs or (skipped_by_retry + refetched_by_retry == len(keys)
                                    and skipped_by_retry >= len(committed_at_kill)))
        info = instance.event_log_storage.get_concurrency_info("downloads")
        figures["pool_downloads"] = {"limit": getattr(info, "slot_count", None), "max_claimed_seen": max_claimed,
                                     "claimed_after_end": len(getattr(info, "claimed_slots", []) or []),
                                     "claimed_by": sorted({s.run_id[:8] for s in
                                                           (getattr(info, "claimed_slots", []) or [])})}
        if pg is not None:
            with contextlib.closing(pg.connect()) as conn, conn.cursor() as cur:
                cur.execute("select pg_database_size(current_database())")
                figures["storage_size_mb"] = round(cur.fetchone()[0] / 2**20, 1)
                cur.execute("select relname, pg_total_relation_size(relid) from pg_catalog.pg_statio_user_tables "
                            "order by 2 desc limit 4")
                figures["largest_tables_mb"] = {n: round(s / 2**20, 1) for n, s in cur.fetchall()}
                cur.execute("select dagster_event_type, count(*), avg(length(event)), max(length(event)) from "
                            "event_logs group by 1 order by 3 desc nulls last limit 5")
                figures["event_bytes_by_type"] = {t: {"n": n, "avg": round(float(a)), "max": mx}
                                                  for t, n, a, mx in cur.fetchall()}
        else:
            figures["storage_size_mb"] = round(sum(p.stat().st_size for p in home.rglob("*") if p.is_file()) / 2**20, 1)

        # -- the UI's pages -----------------------------------------------------------------------------------------
        akey = {"path": [ASSET]}
        plan = [
            ("asset page: PartitionHealthQuery", "PartitionHealthQuery", {"assetKey": akey}),
            ("asset page: AssetViewDefinitionQuery", "AssetViewDefinitionQuery", {"assetKey": akey}),
            ("asset page: AssetGraphLiveQuery", "AssetGraphLiveQuery", {"assetKeys": [akey]}),
            ("asset page: RecentAssetEventsQuery (limit 100)", "RecentAssetEventsQuery",
             {"assetKey": akey, "limit": 100,
              "eventTypeSelectors": ["MATERIALIZATION", "FAILED_TO_MATERIALIZE", "OBSERVATION"]}),
            ("asset page: LatestAssetPartitionsQuery (limit 100)", "LatestAssetPartitionsQuery",
             {"assetKey": akey, "limit": 100}),
            ("backfill page: BackfillDetailsQuery", "BackfillDetailsQuery", {"backfillId": backfill_id}),
            ("backfill page: BackfillPartitionsForAssetKey", "BackfillPartitionsForAssetKey",
             {"backfillId": backfill_id, "assetKey": akey}),
            ("backfills list: RunsFeedRootQuery view BACKFILLS", "RunsFeedRootQuery",
             {"limit": 30, "view": "BACKFILLS", "filter": {}}),
            ("runs list: RunsFeedRootQuery view RUNS", "RunsFeedRootQuery", {"limit": 30, "view": "RUNS", "filter": {}}),
            ("runs list: RunsFeedRootQuery view ROOTS", "RunsFeedRootQuery", {"limit": 30, "view": "ROOTS", "filter": {}}),
        ]
        def time_ui() -> dict:
            timings = {}
            for label, name, variables in plan:
                if name not in queries:
                    timings[label] = "query not in this webserver's bundle"
                    continue
                ms_list, err = [], None
                for _ in range(args.repeats):
                    body, ms = gql(web_port, queries[name], variables)
                    ms_list.append(ms)
                    if body.get("errors"):
                        err = str(body["errors"])[:300]
                timings[label] = {"median_ms": round(statistics.median(ms_list)), "max_ms": round(max(ms_list)),
                                  "bytes": len(json.dumps(body)), **({"errors": err} if err else {})}
                log(f"{label}: {timings[label]}")
            return timings

        figures["graphql_after_backfill"] = time_ui()

        # -- many runs: single-shard backfills, as a user re-materializing shards one at a time ------------------------
        if args.extra_runs:
            t0 = time.time()
            ids = []
            for k in keys[:args.extra_runs]:
                body, _ = gql(web_port, LAUNCH, {"backfillParams": {
                    "assetSelection": [{"path": [ASSET]}], "partitionNames": [k], "fromFailure": False, "tags": []}})
                ids.append(body["data"]["launchPartitionBackfill"]["backfillId"])
            max_claimed2 = max_pending = 0
            while time.time() - t0 < args.extra_timeout:
                time.sleep(2)
                info = instance.event_log_storage.get_concurrency_info("downloads")
                max_claimed2 = max(max_claimed2, len(info.claimed_slots or []))
                max_pending = max(max_pending, len(getattr(info, "pending_steps", []) or []))
                bfs = [instance.get_backfill(i) for i in ids]
                if all(b.status not in (BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING,
                                        BulkActionStatus.FAILING) for b in bfs):
                    if not any(not r.is_finished for i in ids
                               for r in instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": i}))):
                        break
            extra_runs = [r for i in ids for r in instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": i}))]
            figures["extra_runs"] = {"backfills": len(ids), "runs": len(extra_runs),
                                     "succeeded": sum(r.status == dg.DagsterRunStatus.SUCCESS for r in extra_runs),
                                     "wall_s": round(time.time() - t0, 1),
                                     "downloads_slots_max_claimed": max_claimed2,
                                     "downloads_max_pending_steps": max_pending,
                                     "runs_in_storage": instance.get_runs_count(),
                                     "backfills_in_storage": len(instance.get_backfills())}
            log(f"extra runs: {figures['extra_runs']}")
            figures["graphql_after_extra_runs"] = time_ui()
        figures["total_s"] = round(time.time() - t_all, 1)
        procs.stop_all()
    print(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
