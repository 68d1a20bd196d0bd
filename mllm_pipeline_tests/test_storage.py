"""The storage root: atomic files, committed versions, and the same behaviour on a real S3 endpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mllm_pipeline.storage import Storage


def test_atomic_write_publishes_only_on_success(storage):
    with storage.atomic_write("a/b.txt") as f:
        f.write(b"one")
    with pytest.raises(RuntimeError):
        with storage.atomic_write("a/b.txt") as f:
            f.write(b"half-written")
            raise RuntimeError("killed mid-write")
    assert storage.read_bytes("a/b.txt") == b"one"
    assert storage.listdir("a") == ["b.txt"]  # no temporary file left behind


def test_uncommitted_version_is_never_read_and_commits_delete_nothing(storage):
    with storage.new_version("raw/x", {"rows": 1}) as v1:
        storage.write_bytes(v1.rel("shard-00000.parquet"), b"v1")
        v1.commit({"shards": [{"file": "shard-00000.parquet", "rows": 1}]})
    # a run that dies after writing a shard but before committing (its lock is gone with its process)
    v2 = storage.new_version("raw/x", {"rows": 2})
    storage.write_bytes(v2.rel("shard-00000.parquet"), b"half")
    assert storage.read_manifest("raw/x")["version"] == v1.id  # readers still see v1
    with pytest.raises(ValueError):
        with storage.new_version("raw/x", {"rows": 3}) as v3:
            storage.write_bytes(v3.rel("shard-00000.parquet"), b"v3")
            raise ValueError("failed before commit")
    assert v3.id not in storage.listdir("raw/x")  # a failing run removes its own files
    with storage.new_version("raw/x", {"rows": 2}) as v4:  # same identity as the dead run: its leftovers are cleared
        assert v4.id == v2.id and not storage.exists(v4.rel("shard-00000.parquet"))
        storage.write_bytes(v4.rel("shard-00000.parquet"), b"v4")
        v4.commit({"shards": [{"file": "shard-00000.parquet", "rows": 1}]})
    assert storage.read_bytes(f"raw/x/{v1.id}/shard-00000.parquet") == b"v1"  # the older version is still there
    assert storage.read_manifest("raw/x")["inputs"] == []


def test_version_ids_follow_the_identity_and_up_to_date_finds_them(storage):
    ident = {"stage": "raw", "files": [{"path": "a.tsv", "size": 3, "content": "xxh3:1"}]}
    assert storage.up_to_date("raw/x", ident) is None
    with storage.new_version("raw/x", ident, inputs=[{"prefix": "up", "version": "v-1"}]) as v:
        v.commit({"rows_in": 1})
    again = storage.new_version("raw/x", ident)
    assert again.id == v.id  # same inputs, same name
    assert storage.up_to_date("raw/x", ident)["version"] == v.id
    other = {**ident, "files": [{"path": "a.tsv", "size": 3, "content": "xxh3:2"}]}
    with storage.new_version("raw/x", other) as w:
        w.commit({"rows_in": 2})
    assert storage.read_manifest("raw/x")["version"] == w.id
    # the change is undone: the earlier version becomes current again, nothing is rewritten
    assert storage.up_to_date("raw/x", ident)["version"] == v.id
    assert storage.read_manifest("raw/x")["version"] == v.id
    assert storage.read_manifest("raw/x")["inputs"] == [{"prefix": "up", "version": "v-1"}]
    with pytest.raises(RuntimeError, match="already committed"):
        with storage.new_version("raw/x", ident):
            pass
    fresh = storage.new_version("raw/x", ident, fresh=True)  # a forced re-fetch never reuses a readable id
    assert fresh.id != v.id and fresh.id.startswith(v.id)


_HOLD = """
import sys, time
from mllm_pipeline.storage import Storage
st = Storage(sys.argv[1])
with st.new_version("media/cc3m/shard-00000", {"n": 1}) as v:
    st.write_bytes(v.rel("media.tar"), b"a")
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    v.commit({"summary": {}})
print("committed", flush=True)
"""


def _holder(root: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, root, str(seconds)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_two_writers_of_one_output_one_wins_the_other_fails_with_a_message(storage):
    from mllm_pipeline.storage import ConcurrentWriteError

    proc = _holder(storage.root, 3)
    with pytest.raises(ConcurrentWriteError, match=r"being written by another run .*process \d+ .*nothing was written"):
        with storage.new_version("media/cc3m/shard-00000", {"n": 2}) as v:
            storage.write_bytes(v.rel("media.tar"), b"b")
            v.commit({"summary": {}})
    assert proc.wait(30) == 0 and proc.stdout.read().strip() == "committed"
    m = storage.read_manifest("media/cc3m/shard-00000")
    assert storage.read_bytes(f"media/cc3m/shard-00000/{m['version']}/media.tar") == b"a"  # the winner's, intact
    assert not storage.exists("media/cc3m/shard-00000/_lock.json")


def test_a_lock_left_by_a_killed_process_is_taken_over(storage):
    proc = _holder(storage.root, 60)
    proc.kill()
    proc.wait(10)
    assert storage.exists("media/cc3m/shard-00000/_lock.json")
    with storage.new_version("media/cc3m/shard-00000", {"n": 1}) as v:  # same identity: the leftovers are cleared
        storage.write_bytes(v.rel("media.tar"), b"c")
        v.commit({"summary": {}})
    assert storage.read_manifest("media/cc3m/shard-00000")["version"] == v.id


def test_s3_lock_is_a_conditional_put(s3_env):
    from mllm_pipeline.storage import ConcurrentWriteError, PrefixLock

    storage = Storage(f"s3://{s3_env}/pipeline")
    first = PrefixLock(storage, "manifests")
    first.info["host"] = "another-machine"  # a holder this machine cannot check
    first.acquire()
    with pytest.raises(ConcurrentWriteError, match="another-machine"):
        with storage.new_version("manifests", {"n": 1}):
            pass
    first.release()
    with storage.new_version("manifests", {"n": 1}) as v:
        v.commit({})
    assert storage.read_manifest("manifests")["version"] == v.id


def test_retention_keeps_what_kept_versions_read_and_what_running_jobs_pinned(storage):
    from mllm_pipeline.stages.lineage import apply_retention, pinned, plan_retention

    def commit(prefix, n, inputs=()):
        with storage.new_version(prefix, {"n": n}, inputs=list(inputs)) as v:
            storage.write_bytes(v.rel("data.bin"), b"x" * 100)
            return v.commit({})

    m1 = commit("media/cc3m/shard-00000", 1)
    man1 = commit("manifests", 1, [{"prefix": m1["prefix"], "version": m1["version"]}])
    ck1 = commit("checkpoints/train_mllm", 1, [{"prefix": "manifests", "version": man1["version"]}])
    m2 = commit("media/cc3m/shard-00000", 2)
    m3 = commit("media/cc3m/shard-00000", 3)
    man2 = commit("manifests", 2, [{"prefix": m3["prefix"], "version": m3["version"]}])
    dead = storage.new_version("media/cc3m/shard-00000", {"n": 4})  # a killed run's leftovers
    storage.write_bytes(dead.rel("data.bin"), b"half")

    plan = plan_retention(storage, keep_last=1, min_age_hours=0)
    removed = {(r["prefix"], r["version"]) for r in plan.remove}
    # m1 is read by man1, which the current checkpoint ck1 was trained on: kept; m2 is read by nothing
    assert removed == {("media/cc3m/shard-00000", m2["version"]), ("media/cc3m/shard-00000", dead.id)}
    why = {(k["prefix"], k["version"]): k["why"] for k in plan.keep}
    assert why[("manifests", man1["version"])].startswith("read by checkpoints/train_mllm/")
    assert why[("media/cc3m/shard-00000", m1["version"])].startswith("read by manifests/")
    assert why[("checkpoints/train_mllm", ck1["version"])] == "current"
    young = plan_retention(storage, keep_last=1, min_age_hours=24)  # m2 was superseded seconds ago: kept
    assert {(r["prefix"], r["version"]) for r in young.remove} == {("media/cc3m/shard-00000", dead.id)}
    out = apply_retention(storage, plan)
    assert out["removed"] == 2 and out["bytes_freed"] >= 100
    assert not storage.exists(f"media/cc3m/shard-00000/{m2['version']}")
    assert storage.exists(f"media/cc3m/shard-00000/{m1['version']}/data.bin")

    # a new checkpoint on man2: man1 and m1 are read by nothing kept ... unless a running job pinned man1
    commit("checkpoints/train_mllm", 2, [{"prefix": "manifests", "version": man2["version"]}])
    with pinned(storage, [{"prefix": "manifests", "version": man1["version"]}], "a training run"):
        plan = plan_retention(storage, keep_last=1, min_age_hours=0)
        assert ("media/cc3m/shard-00000", m1["version"]) not in {(r["prefix"], r["version"]) for r in plan.remove}
    plan = plan_retention(storage, keep_last=1, min_age_hours=0)
    gone = {(r["prefix"], r["version"]) for r in plan.remove}
    assert {("manifests", man1["version"]), ("media/cc3m/shard-00000", m1["version"]),
            ("checkpoints/train_mllm", ck1["version"])} <= gone
    assert ("media/cc3m/shard-00000", m3["version"]) not in gone


def test_missing_manifest_message(storage):
    with pytest.raises(FileNotFoundError, match="materialize the asset"):
        storage.read_manifest("raw/nothing")


def test_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLLM_STORAGE_ROOT", str(tmp_path / "elsewhere"))
    assert Storage().root == str(tmp_path / "elsewhere")




def test_s3_root_atomic_writes_and_versions(s3_env):
    storage = Storage(f"s3://{s3_env}/pipeline")
    assert not storage.local
    with pytest.raises(RuntimeError):
        with storage.atomic_write("a/b.bin") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("killed")
    assert storage.listdir("a") == []
    with storage.new_version("raw/x", {"n": 1}) as v:
        storage.write_bytes(v.rel("shard-00000.parquet"), b"data")
        v.commit({"shards": [{"file": "shard-00000.parquet", "rows": 1}]})
    m = storage.read_manifest("raw/x")
    assert m["location"] == f"s3://{s3_env}/pipeline/raw/x/{v.id}"
    assert storage.read_bytes(f"raw/x/{v.id}/shard-00000.parquet") == b"data"


def test_s3_source_to_s3_root(s3_env, fixtures):
    """A WebVid CSV read from s3:// into shards written to s3://, through the same parser."""
    import fsspec

    from mllm_pipeline.sources.webvid import ingest_webvid
    from mllm_pipeline.storage import storage_options_for

    src = f"s3://{s3_env}/annotations/results_2M_val.csv"
    with fsspec.open(src, "wb", **storage_options_for(src)) as f:
        f.write((fixtures / "webvid_real_20.csv").read_bytes())
    storage = Storage(f"s3://{s3_env}/root")
    report = ingest_webvid([src], storage)
    assert report.rows_kept == 20 and report.location.startswith(f"s3://{s3_env}/root/raw/webvid/")
    import pyarrow.parquet as pq

    from mllm_pipeline.sources.common import read_raw_shards

    uris = read_raw_shards(storage, "webvid")
    with fsspec.open(uris[0], "rb", **storage_options_for(uris[0])) as f:
        assert pq.read_table(f).num_rows == 20
