"""What a killed run leaves behind is cleaned up by the next one (its write locks, its scratch folders), and secrets
in URLs never reach run metadata, logs or status tables."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from mllm_pipeline.redact import redact_text, redact_url
from mllm_pipeline.stages.lineage import apply_retention, plan_retention
from mllm_pipeline.storage import LOCK_FILE, SCRATCH_OWNER, holder_alive, process_record, scratch_dir

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def _commit(storage, prefix: str, n: int) -> dict:
    with storage.new_version(prefix, {"n": n}) as v:
        storage.write_bytes(v.rel("data.bin"), b"x" * 10)
        return v.commit({})


def test_retention_takes_over_the_lock_of_a_dead_writer_and_removes_its_leftovers(storage):
    prefix = "media/cc3m/shard-00000"
    _commit(storage, prefix, 1)
    leftover = storage.new_version(prefix, {"n": 2})  # a killed run: its version directory and its lock stay
    storage.write_bytes(leftover.rel("media.tar"), b"half")
    storage.write_json(f"{prefix}/{LOCK_FILE}", {"token": "t", "host": socket.gethostname(), "pid": _dead_pid(),
                                                 "started": time.time() - 60, "run_id": "r", "since": "then"})
    plan = plan_retention(storage, keep_last=1, min_age_hours=0)
    gone = {r["version"]: r["why"] for r in plan.remove}
    assert leftover.id in gone and "taken over" in gone[leftover.id]
    apply_retention(storage, plan)
    assert not storage.exists(f"{prefix}/{leftover.id}")
    assert not storage.exists(f"{prefix}/{LOCK_FILE}")  # taken over, then released
    assert storage.read_manifest(prefix)["version"].startswith("v-")  # the committed version is untouched


def test_a_pid_reused_by_another_process_does_not_keep_a_lock_alive(storage):
    me = process_record()
    assert holder_alive(me)
    assert not holder_alive({**me, "started": me["started"] - 3600})  # same pid, a process that started later
    assert holder_alive({**me, "host": "another-machine", "pid": _dead_pid()})  # another machine: cannot tell
    assert not holder_alive({"host": me["host"], "pid": _dead_pid()})  # a lock written before start times: pid rule


def test_retention_leaves_a_live_writer_alone(storage):
    prefix = "media/cc3m/shard-00000"
    _commit(storage, prefix, 1)
    writing = storage.new_version(prefix, {"n": 2})
    with writing:  # a writer in this (live) process holds the lock while retention runs
        storage.write_bytes(writing.rel("media.tar"), b"half")
        plan = plan_retention(storage, keep_last=1, min_age_hours=0)
        assert writing.id not in {r["version"] for r in plan.remove}
        apply_retention(storage, plan)
        assert storage.exists(writing.rel("media.tar"))
        writing.commit({})
    assert storage.read_manifest(prefix)["version"] == writing.id


_SCRATCH = """
import sys, time
from mllm_pipeline.storage import scratch_dir
with scratch_dir("mllm-img2dataset-", sys.argv[1]) as path:
    open(path + "/urls.parquet", "wb").write(b"x")
    print(path, flush=True)
    time.sleep(120)
"""


def test_scratch_folders_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SCRATCH, str(work)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    left = Path(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert (left / "urls.parquet").exists() and json.loads((left / SCRATCH_OWNER).read_text())["pid"] == proc.pid
    foreign = work / "mllm-someone-else"  # no owner record: not ours to judge, left alone
    foreign.mkdir()
    live = subprocess.Popen([sys.executable, "-c", _SCRATCH, str(work)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        running = Path(live.stdout.readline().strip())
        with scratch_dir("mllm-video2dataset-", str(work)) as mine:  # the next run
            assert not left.exists()  # the killed run's scratch is gone
            assert running.exists() and Path(mine).exists() and foreign.exists()  # a live run's stays
        assert not Path(mine).exists()
    finally:
        live.kill()
        live.wait(30)


def test_redact_url_and_text():
    assert redact_url("https://user:pa55@cdn.example.com/a/x.jpg") == "https://***@cdn.example.com/a/x.jpg"
    assert redact_url("https://b.s3.amazonaws.com/x.jpg?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc&w=3") == \
        "https://b.s3.amazonaws.com/x.jpg?X-Amz-Credential=***&X-Amz-Signature=***&w=3"
    assert redact_url("https://h/x.jpg?w=1&h=2") == "https://h/x.jpg?w=1&h=2"  # nothing secret: unchanged
    assert redact_text("HTTP Error 403 for https://h/x.jpg?sig=S3CR3T&token=T0K (retry)") == \
        "HTTP Error 403 for https://h/x.jpg?sig=***&token=*** (retry)"
    assert redact_text("alice:hunter2@127.0.0.1 does not resolve") == "***@127.0.0.1 does not resolve"
    assert redact_text("ask bob@example.org, at 10:30") == "ask bob@example.org, at 10:30"
    assert redact_url("https://h/r?to=https%3A%2F%2Fs3%2Fx.jpg%3FX-Amz-Signature%3DS&w=1") == \
        "https://h/r?to=https://s3/x.jpg%3FX-Amz-Signature%3D***&w=1"  # a signed URL inside a parameter
    assert redact_text(None) is None and redact_text("no url here") == "no url here"


def test_a_password_in_a_url_reaches_no_metadata_status_table_or_log(tmp_path, capfd, monkeypatch):
    from mllm_pipeline.defs.ingest.assets import raw_cc3m
    from mllm_pipeline.defs.media.assets import images_cc3m
    from mllm_pipeline.defs.resources import StorageResource, TrackingResource
    from mllm_pipeline.stages.media import read_status
    from mllm_pipeline.storage import Storage
    from mllm_pipeline_tests.download.conftest import make_jpeg
    from mllm_pipeline_tests.media_server import serve_directory

    monkeypatch.delenv("MLLM_ALLOW_LOOPBACK", raising=False)
    secrets = ("hunter2pass", "SIGSECRET123", "TOKENSECRET456")
    make_jpeg(tmp_path / "www/img/0.jpg", 64, 48, 0)
    with serve_directory(tmp_path / "www") as server:
        host = server.base_url.split("://", 1)[1]
        urls = [
            f"http://alice:{secrets[0]}@{host}/img/0.jpg",
            f"{server.base_url}/img/missing.jpg?X-Amz-Signature={secrets[1]}&w=2",
            f"{server.base_url}/_fault/redirect?to=http://169.254.169.254/x%3Ftoken%3D{secrets[2]}&token={secrets[2]}",
            f"ftp://bob:{secrets[0]}@files.example.com/x.jpg?token={secrets[2]}",
            f"{server.base_url}/img/0.jpg?token={secrets[2]}",
        ]
        tsv = tmp_path / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"a photo of thing number {i}\t{u}\n" for i, u in enumerate(urls)))
        root = str(tmp_path / "root")
        resources = {"storage": StorageResource(root=root), "tracking": TrackingResource()}
        with dg.instance_for_test() as instance:
            raw = dg.materialize([raw_cc3m], instance=instance, resources=resources,
                                 run_config={"ops": {"raw_cc3m": {"config": {"paths": [str(tsv)]}}}})
            media = dg.materialize([images_cc3m], instance=instance, resources=resources, partition_key="shard-00000",
                                   run_config={"ops": {"images_cc3m": {"config": {
                                       "processes": 1, "threads": 4, "retries": 0, "timeout_s": 5, "image_size": 64,
                                       "allow_loopback": True}}}})
            assert raw.success and media.success
            texts = [repr(e) for e in instance.all_logs(raw.run_id) + instance.all_logs(media.run_id)]
            for result, node in ((raw, "raw_cc3m"), (media, "images_cc3m")):
                for m in result.asset_materializations_for_node(node):
                    texts.append(repr(m.metadata))
        out = capfd.readouterr()
        texts += [out.out, out.err]
    storage = Storage(root)
    status = read_status(storage, "cc3m", "shard-00000").sort_by("row")
    texts.append(json.dumps(status.to_pylist()))
    texts.append(json.dumps(storage.read_manifest("media/cc3m/shard-00000")))
    texts.append(json.dumps(storage.read_manifest("raw/cc3m")))
    assert status["status"].to_pylist()[3] == "failed" and "ftp://***@files.example.com" in status["detail"][3].as_py()
    joined = "\n".join(texts)
    assert "https://" in joined or "http://" in joined  # the URLs are there, without their secrets
    for secret in secrets:
        assert secret not in joined, [t for t in texts if secret in t][0][:2000]
    # the URL is the data itself: the raw shard keeps it exactly (docs/media.md says so)
    from mllm_pipeline.sources.common import raw_shards
    from mllm_pipeline.storage import read_parquet

    assert read_parquet(raw_shards(storage, "cc3m")[0].uri)["url"].to_pylist() == urls
