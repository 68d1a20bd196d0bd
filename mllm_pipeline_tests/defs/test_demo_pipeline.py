"""The main job on the embedded demo corpus, in process and through the CLI the README gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from mllm_pipeline.definitions import defs
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.demo.summary import committed_outputs
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.metadata import blobs, table_column, table_rows

REPO = Path(__file__).resolve().parents[2]
RAW = ["raw_cc3m", "raw_cc3m_wds", "raw_webvid", "raw_msrvtt", "raw_coco", "raw_internvid"]


def test_demo_pipeline_in_process(tmp_path, monkeypatch):
    from mllm_pipeline.demo.config import raw_run_config
    from mllm_pipeline.demo.paths import demo_dir, ensure_demo_corpus

    monkeypatch.delenv("MLLM_DEMO_DIR", raising=False)
    storage = Storage(str(tmp_path / "root"))
    generated = ensure_demo_corpus(storage)  # the demo, like any user, has its files before it runs the job
    from mllm_pipeline.demo.config import demo_paths

    assert {k: str(v) for k, v in generated.items() if k in demo_paths(demo_dir(storage))} == demo_paths(demo_dir(storage))
    job = defs.resolve_job_def("demo_pipeline")
    run_config = {**raw_run_config(demo_dir(storage)), "resources": {"storage": {"config": {"root": storage.root}}}}
    result = job.execute_in_process(run_config=run_config, resources={"storage": StorageResource(root=storage.root)})
    assert result.success
    md = {n: result.asset_materializations_for_node(n)[0].metadata for n in RAW}
    for name, m in md.items():
        assert m["rows_kept"].value > 0, name
        assert m["rows_in"].value == m["rows_kept"].value + m["rows_quarantined"].value, name
    # the demo's deliberate bad rows are set aside, each with its reason
    assert {"wrong_field_count", "invalid_utf8"} <= set(table_column(md["raw_cc3m"]["quarantine_by_reason"], "reason"))
    assert "duplicate_id" in table_column(md["raw_webvid"]["quarantine_by_reason"], "reason")
    assert "invalid_json" in table_column(md["raw_internvid"]["quarantine_by_reason"], "reason")
    assert "image_missing" in table_column(md["raw_coco"]["quarantine_by_reason"], "reason")
    # tables, not blobs: no metadata value of the job is a JSON dict of more than a handful of keys
    every = [(e.asset_key.to_user_string(), e.step_materialization_data.materialization.metadata)
             for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert every and not {name: blobs(m) for name, m in every if blobs(m)}
    # MSR-VTT as MMAction2 prepares it, under 9k-1kA: the 9k training file and the 1k-A test video
    assert md["raw_msrvtt"]["videos_by_split"].value == {"train": 11, "test": 1}
    assert table_rows(md["raw_msrvtt"]["mc_test"])[0]["videos_overlapping_training"] == 1
    storage = Storage(str(tmp_path / "root"))
    assert {p for p, _ in committed_outputs(storage)} == {
        "raw/cc3m", "raw/cc3m_wds", "raw/webvid", "raw/msrvtt", "raw/coco", "raw/internvid"}
    # MSR-VTT points at the demo's local videos, which exist
    from mllm_pipeline_tests.helpers import read_raw

    for p in read_raw(storage, "msrvtt").column("path").to_pylist():
        assert Path(p).is_file()
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in result.get_asset_check_evaluations()}
    assert all(checks[(n, "rows_accounted")] for n in RAW)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_command_from_the_readme(tmp_path):
    """What scripts/demo.sh runs: the unpartitioned job, then every media asset over all its shards, via the CLI."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "MLLM_STORAGE_ROOT": str(tmp_path / "root"), "DAGSTER_HOME": str(tmp_path / "home"),
           "MLLM_DEMO_MEDIA_URL": f"http://127.0.0.1:{_free_port()}", "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLLM_DEMO_DIR", None)
    (tmp_path / "home").mkdir()
    proc = subprocess.run([sys.executable, "-m", "mllm_pipeline.demo.run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "$ dagster asset materialize -m mllm_pipeline.definitions --select videos_internvid,captions_internvid --partition-range shard-00000...shard-00000" in out
    assert ("$ dagster asset materialize -m mllm_pipeline.definitions --select media_hashes,captions_dedup,manifests,export_media,"
            "export_videochat2,export_ixc2,export_internvl,export_llava,train_mllm") in out
    assert "raw/webvid" in out and "media/internvid/shard-00000" in out and str(tmp_path / "root") in out
    storage = Storage(str(tmp_path / "root"))
    from mllm_pipeline.demo.summary import media_outputs

    media = {p: m["summary"] for p, m in media_outputs(storage)}
    assert set(media) == {f"media/{d}/shard-00000" for d in ("cc3m", "coco", "webvid", "msrvtt", "internvid", "cc3m_wds")}
    assert media["media/cc3m/shard-00000"]["failed_by_reason"] == {"http_404": 1}  # the demo's deliberate 404
    for prefix, s in media.items():
        raw = storage.read_manifest("raw/" + prefix.split("/")[1])
        assert s["attempted"] == raw["rows_kept"], prefix  # every kept raw row is accounted for
        if prefix != "media/cc3m/shard-00000":
            assert s["succeeded"] == s["attempted"], (prefix, s)
    # runs were recorded in DAGSTER_HOME, so `dagster dev` shows them, with per-partition materializations
    instance = dg.DagsterInstance.from_config(str(tmp_path / "home"))
    assert any(r.job_name == "demo_pipeline" for r in instance.get_runs())
    assert instance.get_dynamic_partitions("internvid_shards") == ["shard-00000"]
    event = instance.get_latest_materialization_event(dg.AssetKey("videos_internvid"))
    assert event.asset_materialization.partition == "shard-00000"
    assert event.asset_materialization.metadata["succeeded"].value == 18

    # clean captions: the demo's noisy CC3M captions are repaired or set aside with their reason
    from mllm_pipeline.stages.captions import read_kept

    kept = read_kept(storage, "cc3m", "shard-00000")["caption"].to_pylist()
    assert "a chef & his team cooking in a modern kitchen" in kept
    assert "a surfer riding a wave, more at" in kept and not any("https://" in c for c in kept)
    assert "the café terrace on a sunny morning!" in kept
    cap = storage.read_manifest("captions/cc3m/shard-00000")["counts"]
    # row 13 repeats row 4's caption for another image, as do the two "premiere" rows: both kept (one medium's
    # captions are de-duplicated among themselves only)
    assert cap["too_short"] == 1 and cap["exact_duplicate"] == 0
    assert cap["captions_in"] == cap["captions_kept"] + cap["captions_rejected"]
    # the watermark stage flags the 15 marked WebVid clips and keeps every clip with its region (the default mode)
    wm = storage.read_manifest("curated/webvid_watermark/shard-00000")["summary"]
    assert (wm["clips"], wm["flagged"], wm["dropped"], wm["kept"]) == (22, 15, 0, 22)
    # manifests: the training tables per split; the LLaVA JSON a trainer reads is the LLaVA export's, and every
    # file it points at is under the shared media root
    import json as _json

    man = storage.read_manifest("manifests")
    assert man["summary"]["splits"]["train"] > 0 and man["summary"]["splits"]["test"] > 0  # MSR-VTT's test split
    assert not (Path(man["location"]) / "llava").exists()  # one stage per output
    llava = Path(storage.read_manifest("exports/llava")["location"])
    for name in ("train_images.json", "train_videos.json"):
        records = _json.loads((llava / "llava" / name).read_text())
        assert records and all((tmp_path / "root/exports/media" / (r.get("image") or r.get("video"))).is_file()
                               for r in records)
    from mllm_pipeline.manifests import read_manifest_split

    import pyarrow as pa
    import pyarrow.compute as pc

    rows = pa.concat_tables([read_manifest_split(storage, sp) for sp in ("train", "val", "test")])
    assert set(rows["dataset"].to_pylist()) == {"cc3m", "coco", "webvid", "msrvtt", "internvid", "cc3m_wds"}
    # pre-downloaded CC3M: adopted from its tars (no download), cleaned, in the manifests like downloaded CC3M
    assert media["media/cc3m_wds/shard-00000"]["succeeded"] == 30 and "adopting 10 image(s)" in out + proc.stderr
    assert storage.read_manifest("captions/cc3m_wds/shard-00000")["counts"]["captions_in"] == 30
    webvid = rows.filter(pc.equal(rows["dataset"], "webvid"))
    assert len(set(webvid["sample_id"].to_pylist())) > 7  # mask mode: marked clips are kept with their region
    # media copies: the re-hosted image collapses into the first, the copy of a COCO val image is not trained on
    dedup = storage.read_manifest("captions/_dedup")
    decided = {r["sample_id"]: r for r in storage.read_parquet(f"captions/_dedup/{dedup['version']}/media.parquet").to_pylist()}
    assert decided["cc3m-train-000000045"]["reason"] == "media_duplicate"
    assert decided["cc3m-train-000000045"]["kept_sample_id"] == "cc3m-train-000000004"
    assert decided["cc3m-train-000000046"]["reason"] == "eval_leak" and decided["cc3m-train-000000046"]["kept_dataset"] == "coco"
    ids = set(rows["sample_id"].to_pylist())
    assert "cc3m-train-000000046" not in ids and "cc3m-train-000000045" not in ids
    assert {"cc3m-train-000000047", "cc3m-train-000000048"} <= ids
    moved = rows.filter(pc.equal(rows["sample_id"], "cc3m-train-000000004"))["caption"].to_pylist()
    assert "the same picture under a second address" in moved
    for e in man["summary"]["eval_splits"]:  # every evaluation split arrives whole
        assert e["whole"], e
    assert pc.all(pc.equal(rows["seq_len"], pc.add(pc.subtract(rows["text_tokens"], 1), rows["media_tokens"]))).as_py()
    # training: a tiny model trained on the demo's manifests, committed with its metrics
    ckpt = storage.read_manifest("checkpoints/train_mllm")
    assert (Path(ckpt["location"]) / "model").is_dir() and (Path(ckpt["location"]) / "metrics.jsonl").is_file()
    assert ckpt["manifests_version"] == man["version"]
    # the exports of those manifests, each naming its manifests version, media shared from exports/media
    for fmt in ("videochat2", "ixc2", "internvl", "llava"):
        e = storage.read_manifest(f"exports/{fmt}")
        assert e["manifests_version"] == man["version"], fmt
        got = {r["dataset"] for r in e["summary"]["records"]}
        assert "cc3m_wds" in got and got <= set(rows["dataset"].to_pylist()), (fmt, got)
        assert f"export {fmt} " in out  # the summary names it, with its counts
    vc2 = storage.read_manifest("exports/videochat2")
    recs = json.loads((Path(vc2["location"]) / "annotation/videos_images/cc3m_wds/caption_train.json").read_text())
    assert recs and all((tmp_path / "root/exports/media" / r["image"]).is_file() for r in recs)
    assert "pre-downloaded CC3M sample(s)" in out

    # the whole demo again with nothing changed: every stage is up to date, nothing is fetched or written
    def versions() -> set[str]:
        return {str(p.parent) for p in (tmp_path / "root").rglob("_version.json")}

    before = versions()
    again = subprocess.run([sys.executable, "-m", "mllm_pipeline.demo.run"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert versions() == before, "a run with nothing changed wrote a new version"
    assert "fetching" not in log and "training in" not in log
    for stage in ("raw_cc3m", "images_cc3m", "videos_webvid", "captions_msrvtt", "webvid_watermark", "captions_dedup",
                  "manifests", "images_cc3m_wds", "export_media", "export_videochat2", "export_llava", "train_mllm"):
        assert any(stage in line and "up to date" in line for line in log.splitlines()), stage
