"""The media assets through Dagster: shard-range backfills from the CLI, kill -9 and resume, retry of the failed
rows, and the success-rate check. Real img2dataset downloads from a loopback server the tests start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from mllm_pipeline.defs.checks import ACCOUNTING_CHECKS
from mllm_pipeline.defs.media.assets import images_cc3m
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.stages.media import iter_shard, read_status
from mllm_pipeline.sources.cc3m import ingest_cc3m
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import make_jpeg
from mllm_pipeline_tests.media_server import serve_directory
from mllm_pipeline_tests.metadata import table_rows

REPO = Path(__file__).resolve().parents[2]
FAST = {"processes": 1, "threads": 8, "timeout_s": 20, "retries": 0, "allow_loopback": True, "image_size": 64}


def _corpus(tmp_path: Path, n: int, missing: frozenset[int] = frozenset()) -> Path:
    """A folder of ``n`` generated JPEGs (img/000.jpg ...), less the ``missing`` ones, for the loopback server."""
    www = tmp_path / "www"
    for i in range(n):
        if i not in missing:
            make_jpeg(www / f"img/{i:03d}.jpg", 100 + i, 80 + i, i)
    return www


def _tsv(tmp_path: Path, base: str, n: int, slow: dict[int, int] | None = None) -> Path:
    lines = []
    for i in range(n):
        path = f"img/{i:03d}.jpg"
        if slow and i in slow:
            path = f"_fault/slow/{slow[i]}/{path}"
        lines.append(f"a photo of object number {i} on a table\t{base}/{path}")
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


class Cli:
    """The real ``dagster`` CLI against one DAGSTER_HOME and one storage root."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "root"
        self.home = tmp_path / "home"
        self.home.mkdir()
        bindir = Path(sys.executable).parent
        self.env = {**os.environ, "MLLM_STORAGE_ROOT": str(self.root), "DAGSTER_HOME": str(self.home),
                    "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}

    def argv(self, select: str, config: dict, partition: str | None = None, partition_range: str | None = None) -> list[str]:
        cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "mllm_pipeline.definitions",
               "--select", select, "--config-json", json.dumps({"ops": {select: {"config": config}}})]
        if partition:
            cmd += ["--partition", partition]
        if partition_range:
            cmd += ["--partition-range", partition_range]
        return cmd

    def run(self, *args, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args, **kw), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
        return proc

    def run_failing(self, *args, **kw) -> str:
        """Run a command that must fail; its output."""
        proc = subprocess.run(self.argv(*args, **kw), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    def start(self, *args, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args, **kw), cwd=REPO, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    def materialized_partitions(self, asset: str) -> list[str]:
        with self.instance() as instance:
            records = instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records
            return sorted(r.asset_materialization.partition for r in records)


def _requested(server, since: int = 0) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in server.paths[since:]]


def test_cli_backfill_of_a_shard_range_then_retry_only_the_failed(tmp_path):
    www = _corpus(tmp_path, 40, missing=frozenset({12, 25, 27}))
    with serve_directory(www) as server:
        tsv = _tsv(tmp_path, server.base_url, 40)
        cli = Cli(tmp_path)
        cli.run("raw_cc3m", {"paths": [str(tsv)], "rows_per_shard": 10})
        with cli.instance() as instance:
            assert instance.get_dynamic_partitions("cc3m_shards") == [f"shard-{i:05d}" for i in range(4)]

        # a backfill of shards 1..2 only, in one run (single-run backfill policy)
        cli.run("images_cc3m", FAST, partition_range="shard-00001...shard-00002")
        assert sorted(set(_requested(server))) == [f"{i:03d}.jpg" for i in range(10, 30)]
        storage = Storage(str(cli.root))
        assert not storage.exists("media/cc3m/shard-00000/_manifest.json")
        assert not storage.exists("media/cc3m/shard-00003/_manifest.json")
        assert cli.materialized_partitions("images_cc3m") == ["shard-00001", "shard-00002"]
        s2 = storage.read_manifest("media/cc3m/shard-00002")["summary"]
        assert (s2["attempted"], s2["succeeded"], s2["failed_by_reason"]) == (10, 8, {"http_404": 2})

        # two of the missing images appear; retry_failed asks for the failed rows of shard 2 only
        make_jpeg(www / "img/025.jpg", 300, 200, 25)
        make_jpeg(www / "img/027.jpg", 300, 200, 27)
        before = dict(iter_shard(storage, "cc3m", "shard-00002"))
        seen = len(server.paths)
        cli.run("images_cc3m", {**FAST, "retry_failed": True}, partition="shard-00002")
        assert sorted(_requested(server, seen)) == ["025.jpg", "027.jpg"]
        after = dict(iter_shard(storage, "cc3m", "shard-00002"))
        assert len(after) == 10 and all(after[k] == v for k, v in before.items())
        status = read_status(storage, "cc3m", "shard-00002")
        assert status.num_rows == 10 and len(set(status["sample_id"].to_pylist())) == 10
        assert set(status["status"].to_pylist()) == {"success"}
        # shard 1 still has its own failure (row 12), untouched by the retry of shard 2
        assert storage.read_manifest("media/cc3m/shard-00001")["summary"]["failed_by_reason"] == {"http_404": 1}


def test_kill_9_mid_range_then_resume_fetches_each_committed_shard_once(tmp_path):
    www = _corpus(tmp_path, 30)
    with serve_directory(www) as server:
        tsv = _tsv(tmp_path, server.base_url, 30, slow={14: 12})  # shard 1 hangs on one image long enough to be killed
        cli = Cli(tmp_path)
        cli.run("raw_cc3m", {"paths": [str(tsv)], "rows_per_shard": 10})
        storage = Storage(str(cli.root))
        work = tmp_path / "scratch"  # the downloader's scratch folders (work_dir), to see what the kill leaves
        work.mkdir()
        config = {**FAST, "work_dir": str(work)}

        proc = cli.start("images_cc3m", config, partition_range="shard-00000...shard-00002")
        deadline = time.monotonic() + 300
        # the range is one img2dataset run: shard 1 is downloading (and hangs) while shard 0 is committed
        while not (any("_fault/slow" in p for p in server.paths) and storage.exists("media/cc3m/shard-00000/_manifest.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before reaching shard 1"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its run worker and img2dataset's processes
        proc.wait(timeout=30)

        assert storage.exists("media/cc3m/shard-00000/_manifest.json")  # committed before the kill
        assert not storage.exists("media/cc3m/shard-00001/_manifest.json")  # half-written: not committed
        assert not storage.exists("media/cc3m/shard-00002/_manifest.json")
        left = sorted(p.name for p in work.iterdir())
        assert any(n.startswith("mllm-img2dataset-") for n in left), left  # the killed run's scratch stays ...

        cli.run("images_cc3m", config, partition_range="shard-00000...shard-00002")
        assert sorted(p.name for p in work.iterdir()) == []  # ... until the next run removes it
        fetched = _requested(server)
        assert all(fetched.count(f"{i:03d}.jpg") == 1 for i in range(10)), "a committed shard was fetched again"
        keys: list[str] = []
        for shard in ("shard-00000", "shard-00001", "shard-00002"):
            status = read_status(storage, "cc3m", shard)
            assert status.num_rows == 10 and set(status["status"].to_pylist()) == {"success"}, shard
            stored = [k for k, _ in iter_shard(storage, "cc3m", shard)]
            assert sorted(stored) == sorted(status["key"].to_pylist())
            keys += stored
        assert len(keys) == len(set(keys)) == 30  # nothing duplicated, nothing lost


@pytest.fixture
def one_shard(tmp_path):
    """A raw CC3M shard of 10 rows, 6 of them missing on the server, and an instance that knows its partition."""
    www = _corpus(tmp_path, 10, missing=frozenset({0, 2, 4, 6, 8, 9}))
    with serve_directory(www) as server:
        tsv = _tsv(tmp_path, server.base_url, 10)
        storage = Storage(str(tmp_path / "root"))
        ingest_cc3m([str(tsv)], storage, rows_per_shard=10)
        with dg.DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions("cc3m_shards", ["shard-00000"])
            yield storage, instance


def test_success_rate_check_fails_below_the_configured_minimum(one_shard):
    storage, instance = one_shard
    result = dg.materialize(
        [images_cc3m, ACCOUNTING_CHECKS["images_cc3m"]], instance=instance, partition_key="shard-00000",
        resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()},
        run_config={"ops": {"images_cc3m": {"config": {**FAST, "min_success_rate": 0.8}}}},
    )
    assert result.success  # a failed check reports; it does not hide the materialization
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["success_rate"].passed
    assert table_rows(checks["success_rate"].metadata["success_rate_by_shard"]) == [{"shard": "shard-00000", "success_rate": 0.4}]
    assert checks["samples_accounted"].passed
    md = result.asset_materializations_for_node("images_cc3m")[0].metadata
    assert table_rows(md["failed_by_reason"]) == [{"reason": "http_404", "samples": 6, "meaning": "HTTP status 404"}]
    assert table_rows(md["shards"])[0]["attempted"] == 10 and table_rows(md["shards"])[0]["succeeded"] == 4


def test_parallel_shards_commit_each_shard_once_and_keep_the_per_host_rate_global(tmp_path):
    """A range of 4 shards, 3 at a time: each shard committed once with its own accounting, the shards really
    overlap in time, and the per-host rate limit holds for the run as a whole (timestamps at the server)."""
    www = _corpus(tmp_path, 40, missing=frozenset({3, 17, 31}))
    rate = 5.0  # slow enough that each shard's requests span seconds, so the shards in flight overlap at the host
    keys_range = [f"shard-{i:05d}" for i in range(4)]
    with serve_directory(www) as server:
        tsv = _tsv(tmp_path, server.base_url, 40)
        storage = Storage(str(tmp_path / "root"))
        ingest_cc3m([str(tsv)], storage, rows_per_shard=10)
        with dg.DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions("cc3m_shards", keys_range)
            result = dg.materialize(
                [images_cc3m], instance=instance, resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()},
                tags={"dagster/asset_partition_range_start": keys_range[0],
                      "dagster/asset_partition_range_end": keys_range[-1]},
                run_config={"ops": {"images_cc3m": {"config": {**FAST, "parallel_shards": 3, "per_host_rate": rate}}}},
            )
            assert result.success
            events = [(e.timestamp, e.user_message) for e in instance.all_logs(result.run_id)]
            logs = [m for _, m in events]
            per_shard = {m.partition: m.metadata for m in result.asset_materializations_for_node("images_cc3m")}
        paths, times = server.paths, server.times

    fetched = [p.rsplit("/", 1)[-1] for p in paths]
    assert sorted(fetched) == [f"{i:03d}.jpg" for i in range(40)]  # every URL once: no shard fetched twice
    assert sorted(per_shard) == keys_range
    keys: list[str] = []
    for i, expected_failed in enumerate((1, 1, 0, 1)):
        shard = keys_range[i]
        s = storage.read_manifest(f"media/cc3m/{shard}")["summary"]
        assert (s["attempted"], s["succeeded"]) == (10, 10 - expected_failed), shard
        assert s["failed_by_reason"] == ({"http_404": 1} if expected_failed else {}), shard
        assert per_shard[shard]["succeeded"].value == 10 - expected_failed
        manifest = storage.read_manifest(f"media/cc3m/{shard}")
        assert "parallel_shards" not in manifest["options"] and "per_host_rate" not in manifest["options"]
        stored = [k for k, _ in iter_shard(storage, "cc3m", shard)]
        assert sorted(stored) == sorted(k for k in read_status(storage, "cc3m", shard)["key"].to_pylist() if k)
        assert all(k.startswith(f"{i:05d}_") for k in stored)
        keys += stored
    assert len(keys) == len(set(keys)) == 37

    # the shards ran concurrently: shards 1 and 2 started before shard 0 committed
    first_commit = min(t for t, m in events if m.startswith("[cc3m shard-00000] committed"))
    for shard in keys_range[1:3]:
        assert min(t for t, m in events if m.startswith(f"[cc3m {shard}] new shard: fetching")) < first_commit, shard
    # ... and their requests interleaved at the host: some request of a later shard came before the last request of shard 0
    shard_of = [int(name[:3]) // 10 for name in fetched]
    last_of_first = max(t for t, s in zip(times, shard_of) if s == 0)
    assert any(t < last_of_first for t, s in zip(times, shard_of) if s > 0), "the shards ran one after another"
    # politeness is global: in any 1-second window no more than rate (+1 for the window's edges, +1 for arrival
    # jitter) requests reached the one host; three shards each with their own limit would reach ~3x
    times.sort()
    busiest = max(sum(1 for u in times[i:] if u - t < 1.0) for i, t in enumerate(times))
    assert busiest <= rate + 2, f"{busiest} requests within one second at {rate}/s"
    assert times[-1] - times[0] >= (len(times) - 1) / rate * 0.9
    # progress per shard in the run's log
    assert "4 shard(s) in this run, 3 at a time" in logs
    assert all(any(m.startswith(f"progress: {n}/4 shard(s) done") for m in logs) for n in range(1, 5))
