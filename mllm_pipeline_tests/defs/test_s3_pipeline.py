"""The whole pipeline with its storage root on S3: an S3-compatible server on loopback (moto in server mode), the
raw annotation files read from S3 too, and the README's demo command through the real Dagster CLI. Credentials come
only from the environment and never appear in logs, metadata or the instance's event log."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import boto3

from mllm_pipeline.demo.generate import generate_demo_corpus
from mllm_pipeline.storage import Storage

REPO = Path(__file__).resolve().parents[2]
SECRET = "mllm-test-secret-7f3b9e21"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dagster(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_demo_pipeline_with_the_storage_root_and_raw_files_on_s3(tmp_path, s3_env, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    bucket = s3_env
    root = f"s3://{bucket}/pipeline"
    port = _free_port()
    env = {**os.environ, "MLLM_STORAGE_ROOT": root, "DAGSTER_HOME": str(tmp_path / "home"),
           "MLLM_DEMO_DIR": str(tmp_path / "demo"), "MLLM_DEMO_MEDIA_URL": f"http://127.0.0.1:{port}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "home").mkdir()

    proc = subprocess.run([sys.executable, "-m", "mllm_pipeline.demo.run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    storage = Storage(root)
    for prefix in ("raw/cc3m", "media/cc3m/shard-00000", "media/webvid/shard-00000", "captions/cc3m/shard-00000",
                   "captions/_dedup", "curated/webvid_watermark/shard-00000", "manifests", "checkpoints/train_mllm"):
        manifest = storage.read_manifest(prefix)
        assert manifest["location"].startswith(root), prefix
    assert storage.read_manifest("manifests")["summary"]["splits"]["train"] > 0
    train = storage.read_manifest("checkpoints/train_mllm")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=os.environ["MLLM_S3_ENDPOINT_URL"]).list_objects_v2(
        Bucket=bucket, Prefix=f"pipeline/checkpoints/train_mllm/{train['version']}/")["Contents"]]
    assert any(k.endswith(".safetensors") for k in keys), keys

    # an export on S3 moves like a local one: synced down with its media, pointed at them by its own locate.py, read
    # with the trainer's loading rules
    from mllm_pipeline.storage import filesystem_for
    from mllm_pipeline_tests.exports import trainers

    fs, media_path = filesystem_for(f"{root}/exports/media")
    fs.get(media_path + "/", str(tmp_path / "local/media"), recursive=True)
    loaded = {}
    for fmt, meta in (("ixc2", "ixc2/data.txt"), ("internvl", "internvl/meta_train.json")):
        e = storage.read_manifest(f"exports/{fmt}")
        assert e["location"].startswith(root)
        fs.get(filesystem_for(e["location"])[1] + "/", str(tmp_path / f"local/{fmt}"), recursive=True)
        located = subprocess.run([sys.executable, "-I", str(tmp_path / f"local/{fmt}/locate.py"), "--media-root",
                                  str(tmp_path / "local/media"), "--check"], capture_output=True, text=True, timeout=120)
        assert located.returncode == 0 and "0 missing" in located.stdout, located.stdout + located.stderr
        load = trainers.ixc2_load if fmt == "ixc2" else trainers.internvl_load
        loaded[fmt] = load(str(tmp_path / f"local/{fmt}/{meta}"))
        assert loaded[fmt] and all(p.startswith(str(tmp_path / "local/media")) for x in loaded[fmt] for p in x["media"])

    # the raw annotation files themselves on S3: a CC3M TSV uploaded there and ingested from its s3:// URL
    corpus = generate_demo_corpus(tmp_path / "corpus", base_url=f"http://127.0.0.1:{port}")
    s3 = boto3.client("s3", endpoint_url=os.environ["MLLM_S3_ENDPOINT_URL"])
    s3.upload_file(str(corpus["cc3m_train"]), bucket, "annotations/Train_GCC-training.tsv")
    out = _dagster(env, "asset", "materialize", "-m", "mllm_pipeline.definitions", "--select", "raw_cc3m", "--config-json",
                   '{"ops": {"raw_cc3m": {"config": {"paths": ["s3://%s/annotations/Train_GCC-training.tsv"]}}}}' % bucket)
    assert storage.read_manifest("raw/cc3m")["sources"] == [f"s3://{bucket}/annotations/Train_GCC-training.tsv"]

    # the secret key appears nowhere: not in any output, not in the instance's storage (runs, events, metadata)
    assert SECRET not in proc.stdout + proc.stderr + out.stdout + out.stderr
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
