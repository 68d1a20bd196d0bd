"""raw_msrvtt with the CLIP4Clip bundle's split lists and MSRVTT-QA: the scheme and the lists are part of the raw
version's identity, the metadata reports the counts per split, and a missing list fails before anything is read."""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline_tests.sources.msrvtt_bundle import write_bundle
from mllm_pipeline_tests.metadata import table_column

ASSET = next(a for a in RAW_ASSETS if a.key.to_user_string() == "raw_msrvtt")


def _run(tmp_path, config, raise_on_error=True):
    result = dg.materialize([ASSET], resources={"storage": StorageResource(root=str(tmp_path / "root"))},
                            run_config={"ops": {"raw_msrvtt": {"config": config}}}, raise_on_error=raise_on_error)
    return result, (result.asset_materializations_for_node("raw_msrvtt")[0].metadata if result.success else None)


def test_split_scheme_and_lists_shape_the_version(tmp_path):
    b = write_bundle(tmp_path / "msrvtt")
    config = {"paths": [str(b["data"])], "split_scheme": "9k-1kA", "train_list": str(b["9k"]),
              "test_list": str(b["test"]), "qa_paths": [str(tmp_path / "msrvtt" / "*_qa.json")]}
    _, md = _run(tmp_path, config)
    assert md["videos_by_split"].value == {"train": 26, "test": 4} and md["split_scheme"].value == "9k-1kA"
    assert md["qa_by_split"].value["test"] == {"questions": 16, "set_aside": 0}
    assert md["rows_in"].value == md["rows_kept"].value == 30
    first = md["version"].value
    _, md = _run(tmp_path, config)
    assert md["up_to_date"].value and md["version"].value == first
    _, md = _run(tmp_path, {**config, "split_scheme": "7k-1kA", "train_list": str(b["7k"])})
    assert md["version"].value != first and md["videos_by_split"].value == {"train": 22, "test": 4}
    assert md["videos_outside_scheme"].value == 4 and "not_in_split_lists" in table_column(md["quarantine_by_reason"], "reason")
    b["9k"].write_text(b["9k"].read_text().replace("video0\n", ""))  # the list's content is part of the identity
    _, md = _run(tmp_path, config)
    assert not md["up_to_date"].value and md["version"].value != first
    assert md["videos_by_split"].value == {"train": 25, "test": 4}


def test_a_scheme_without_its_lists_fails_before_reading(tmp_path):
    b = write_bundle(tmp_path / "msrvtt")
    result, _ = _run(tmp_path, {"paths": [str(b["data"])], "split_scheme": "9k-1kA", "train_list": str(b["9k"])},
                     raise_on_error=False)
    assert not result.success
    msg = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error.message
    assert "needs test_list" in msg and "MSRVTT_JSFUSION_test.csv" in msg and "Nothing was read or written" in msg
