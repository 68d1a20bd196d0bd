"""The Dagster code location: it loads, its raw assets materialize with metadata, bad input fails clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from mllm_pipeline.definitions import defs
from mllm_pipeline.defs.checks import ACCOUNTING_CHECKS, QUARANTINE_CHECKS
from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.metadata import table_rows

REPO = Path(__file__).resolve().parents[2]


def test_definitions_load_and_validate():
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"raw_cc3m", "raw_cc3m_wds", "raw_webvid", "raw_msrvtt", "raw_coco", "raw_internvid"} <= keys
    assert defs.resolve_job_def("demo_pipeline") is not None


def test_domain_code_does_not_import_dagster():
    code = (
        "import sys, mllm_pipeline.storage, mllm_pipeline.sources.cc3m, mllm_pipeline.sources.cc3m_wds, "
        "mllm_pipeline.sources.webvid, mllm_pipeline.sources.msrvtt, mllm_pipeline.sources.coco, "
        "mllm_pipeline.sources.internvid, mllm_pipeline.demo.paths, mllm_pipeline.stages.media, "
        "mllm_pipeline.download.images, mllm_pipeline.download.videos, mllm_pipeline.text, mllm_pipeline.vision, "
        "mllm_pipeline.manifests, mllm_pipeline.stages.manifests, mllm_pipeline.stages.captions, "
        "mllm_pipeline.stages.watermark, mllm_pipeline.model, mllm_pipeline.train, mllm_pipeline.train.loop, "
        "mllm_pipeline.stages.raw, mllm_pipeline.stages.lineage, mllm_pipeline.demo.config; print('dagster' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _materialize(tmp_path, asset, config: dict, raise_on_error: bool = True):
    return dg.materialize(
        [asset, ACCOUNTING_CHECKS[asset.key.to_user_string()], QUARANTINE_CHECKS[asset.key.to_user_string()]],
        resources={"storage": StorageResource(root=str(tmp_path / "root"))},
        run_config={"ops": {asset.key.to_python_identifier(): {"config": config}}},
        raise_on_error=raise_on_error,
    )


def test_raw_webvid_metadata_and_checks(tmp_path, fixtures):
    asset = next(a for a in RAW_ASSETS if a.key.to_user_string() == "raw_webvid")
    result = _materialize(tmp_path, asset, {"paths": [str(fixtures / "webvid_real_20.csv")], "rows_per_shard": 8})
    assert result.success
    md = result.asset_materializations_for_node("raw_webvid")[0].metadata
    assert md["rows_in"].value == 20 and md["rows_kept"].value == 20 and md["rows_quarantined"].value == 0
    assert md["dagster/row_count"].value == 20 and md["shard_count"].value == 3
    assert "webvid-1053841541" in md["preview"].value
    assert md["location"].value.startswith(str(tmp_path / "root" / "raw" / "webvid"))
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["rows_accounted"].passed and checks["quarantine_rate"].passed
    assert Storage(str(tmp_path / "root")).read_manifest("raw/webvid")["rows_kept"] == 20


def test_quarantine_shows_by_reason_and_warns(tmp_path):
    src = tmp_path / "Train_GCC-training.tsv"
    src.write_bytes(b"a cat\thttp://x.org/1.jpg\nno url\t\nbroken\n" + b"a dog\thttp://x.org/2.jpg\n" * 2)
    asset = next(a for a in RAW_ASSETS if a.key.to_user_string() == "raw_cc3m")
    result = _materialize(tmp_path, asset, {"paths": [str(src)]})
    md = result.asset_materializations_for_node("raw_cc3m")[0].metadata
    assert (md["rows_in"].value, md["rows_kept"].value, md["rows_quarantined"].value) == (5, 3, 2)
    rows = {r["reason"]: r for r in table_rows(md["quarantine_by_reason"])}
    assert set(rows) == {"missing_url", "wrong_field_count"} and rows["missing_url"]["meaning"] == "the URL field is empty"
    assert rows["missing_url"]["rows"] + rows["wrong_field_count"]["rows"] == 2
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["rows_accounted"].passed
    assert not checks["quarantine_rate"].passed and checks["quarantine_rate"].severity == dg.AssetCheckSeverity.WARN


def test_wrong_file_fails_with_a_message_not_a_traceback(tmp_path):
    src = tmp_path / "results_10M_train.csv"
    src.write_text("id,title\n1,foo\n")
    asset = next(a for a in RAW_ASSETS if a.key.to_user_string() == "raw_webvid")
    result = _materialize(tmp_path, asset, {"paths": [str(src)]}, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    err = failure.step_failure_data.error
    assert str(src) in err.message and "contentUrl" in err.message
    assert failure.step_failure_data.user_failure_data.metadata["file"].value == str(src)


def test_missing_file_and_unmatched_glob(tmp_path):
    asset = next(a for a in RAW_ASSETS if a.key.to_user_string() == "raw_coco")
    result = _materialize(tmp_path, asset, {"paths": [str(tmp_path / "nope.json")]}, raise_on_error=False)
    assert not result.success
    msgs = [e.step_failure_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert any("nope.json" in m for m in msgs)
    result = _materialize(tmp_path, asset, {"paths": [str(tmp_path / "*.json")]}, raise_on_error=False)
    msgs = [e.step_failure_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert any("No file matches" in m for m in msgs)


def test_cli_asset_materialize(tmp_path, fixtures):
    """`dagster asset materialize` as a user runs it, with the storage root from the environment."""
    env = {**os.environ, "MLLM_STORAGE_ROOT": str(tmp_path / "root"), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    config = {"ops": {"raw_webvid": {"config": {"paths": [str(fixtures / "webvid_real_20.csv")]}}}}
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "mllm_pipeline.definitions",
         "--select", "raw_webvid", "--config-json", json.dumps(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stdout + proc.stderr
    assert Storage(str(tmp_path / "root")).read_manifest("raw/webvid")["rows_kept"] == 20


def test_annotation_files_are_observed_by_content_and_make_the_raw_asset_stale(tmp_path, monkeypatch):
    """The observable source's data version follows the files' content: a touch keeps it, an edit changes it, and
    the raw asset records the version it was made from (what the UI compares to mark it stale)."""
    import yaml

    from mllm_pipeline.defs.ingest.assets import raw_cc3m
    from mllm_pipeline.defs.ingest.observe import SOURCE_ASSETS

    source = next(a for a in SOURCE_ASSETS if a.key.to_user_string() == "cc3m_annotation_files")
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a cat on a sofa\thttp://example.org/1.jpg\na dog in a park\thttp://example.org/2.jpg\n")
    watch = tmp_path / "watch.yaml"
    watch.write_text(yaml.safe_dump({"ops": {"raw_cc3m": {"config": {"paths": [str(tsv)]}}}}))
    monkeypatch.setenv("MLLM_WATCH_CONFIG", str(watch))
    resources = {"storage": StorageResource(root=str(tmp_path / "root"))}
    from dagster._core.definitions.observe import observe as dagster_observe  # not exported at the top level in 1.13

    with dg.instance_for_test() as instance:
        def observe() -> str:
            result = dagster_observe([source], instance=instance, resources=resources)
            return result.get_asset_observation_events()[0].event_specific_data.asset_observation.data_version

        first = observe()
        assert first.startswith("files-")
        dg.materialize([source, raw_cc3m], instance=instance, resources=resources,
                       selection=[raw_cc3m], run_config={"ops": {"raw_cc3m": {"config": {"paths": [str(tsv)]}}}})
        st = os.stat(tsv)
        os.utime(tsv, (st.st_atime + 60, st.st_mtime + 60))
        assert observe() == first  # touched, not changed

        # what the UI's stale marker compares: the source's data version the raw asset was made from
        event = instance.get_latest_materialization_event(raw_cc3m.key).asset_materialization
        made_from = event.tags["dagster/input_data_version/cc3m_annotation_files"]
        assert made_from == first == observe()
        tsv.write_text(tsv.read_text().replace("a dog in a park", "a dog in the park"))
        assert observe() != made_from  # the raw asset is stale now


def test_ingest_job_with_two_of_six_datasets(tmp_path, fixtures):
    """The documented ingest job with a config that names two datasets: those two are ingested and checked, the
    other four are skipped (nothing materialized, their checks not run), and the run succeeds."""
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_bytes(b"a cat on a mat\thttp://x.org/1.jpg\na dog in the park\thttp://x.org/2.jpg\n")
    job = defs.resolve_job_def("ingest_raw_annotations")
    instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(
        run_config={"ops": {"raw_cc3m": {"config": {"paths": [str(tsv)]}},
                            "raw_webvid": {"config": {"paths": [str(fixtures / "webvid_real_20.csv")]}}},
                    "resources": {"storage": {"config": {"root": str(tmp_path / "root")}}}},
        instance=instance, raise_on_error=False)
    assert result.success
    done = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert done == {"raw_cc3m", "raw_webvid"}
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {("raw_cc3m", "rows_accounted"): True, ("raw_cc3m", "quarantine_rate"): True,
                      ("raw_webvid", "rows_accounted"): True, ("raw_webvid", "quarantine_rate"): True}
    logs = " ".join(e.user_message for e in instance.all_logs(result.run_id))
    assert "raw_coco: no paths in this run's config; skipped" in logs
    assert "raw_cc3m_wds: no directory in this run's config; skipped" in logs
    st = Storage(str(tmp_path / "root"))
    assert st.read_manifest("raw/cc3m")["rows_kept"] == 2 and st.current("raw/coco") is None
