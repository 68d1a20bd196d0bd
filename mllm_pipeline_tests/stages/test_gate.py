"""The commit gate: a new version is checked before it becomes current; one that fails never replaces the previous
one. The WebVid file has the official ``results_2M_*.csv`` header (``videoid,name,page_idx,page_dir,duration,
contentUrl``, as the WebVid-10M release ships it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_pipeline.sources.webvid import ingest_webvid
from mllm_pipeline.stages.gate import CheckFailed, pipeline_storage, verified_at_commit
from mllm_pipeline.stages.raw import ingest_versioned

HEADER = "videoid,name,page_idx,page_dir,duration,contentUrl"


def _rows(n: int) -> list[str]:
    return [f"{1000 + i},clip number {i} of a calm lake,{i},000001_000050,PT00H00M1{i % 10}S,"
            f"https://example.com/v/{1000 + i}.mp4" for i in range(n)]


def _ingest(storage, path: Path):
    return ingest_versioned(ingest_webvid, [str(path)], storage, prefix="raw/webvid", files=[str(path)], options={})


def test_a_version_that_fails_its_check_never_becomes_current(tmp_path):
    """A file whose every line is malformed (the wrong file under the right name) sets every row aside:
    ``within_quarantine_ceiling`` fails at commit; the good version stays current and is still readable."""
    storage = pipeline_storage(str(tmp_path / "root"))
    csv = tmp_path / "results_2M_val.csv"
    csv.write_text("\n".join([HEADER, *_rows(30)]) + "\n")
    good = _ingest(storage, csv)
    current = storage.read_manifest("raw/webvid")
    assert current["version"] == good.version and current["checks"]["rows_accounted"]["passed"]

    csv.write_text("\n".join([HEADER, *(r.replace(",", ";") for r in _rows(30))]) + "\n")  # no row parses
    with pytest.raises(CheckFailed) as e:
        _ingest(storage, csv)
    assert "within_quarantine_ceiling" in str(e.value) and "no row was kept" in str(e.value)
    assert "raw/webvid" in str(e.value) and "stays current" in str(e.value)
    assert storage.read_manifest("raw/webvid")["version"] == good.version  # the pointer did not move
    assert storage.exists(f"raw/webvid/{good.version}/shard-00000.parquet")
    assert not storage.exists(f"raw/webvid/{e.value.version}")  # the refused version is not left behind


def test_the_recorded_verdict_is_reported_only_to_runs_that_began_before_the_commit(tmp_path):
    storage = pipeline_storage(str(tmp_path / "root"))
    csv = tmp_path / "results_2M_val.csv"
    csv.write_text("\n".join([HEADER, *_rows(20)]) + "\n")
    _ingest(storage, csv)
    m = storage.read_manifest("raw/webvid")
    assert verified_at_commit(m, "rows_accounted", since=0.0).passed
    assert verified_at_commit(m, "rows_accounted", since=4102444800.0) is None  # a run that began after: read again
    assert verified_at_commit(m, "samples_accounted", since=0.0) is None  # not a check of this kind


def test_manifests_without_a_tokenizer_is_a_config_error_naming_the_field(tmp_path):
    """No demo fallback in production: the manifests stage refuses to run without the LLM's tokenizer."""
    import logging

    from mllm_pipeline.manifests import ManifestConfig
    from mllm_pipeline.stages.manifests import ConfigError, materialize_manifests

    storage = pipeline_storage(str(tmp_path / "root"))
    with pytest.raises(ConfigError, match="config field 'tokenizer' is required"):
        materialize_manifests(storage, tokenizer="", config=ManifestConfig(), config_record={}, datasets=None,
                              log=logging.getLogger("test"))
    assert not storage.exists("manifests")
