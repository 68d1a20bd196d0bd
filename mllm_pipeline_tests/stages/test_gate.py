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


class _FlipOneByte:
    """A storage fault: the byte at ``offset`` of what is written reaches the disk changed."""

    def __init__(self, f, offset: int):
        self._f, self._offset, self._at = f, offset, 0

    def write(self, data: bytes) -> int:
        data = bytearray(data)
        if self._at <= self._offset < self._at + len(data):
            data[self._offset - self._at] ^= 0xFF
        self._at += len(data)
        return self._f.write(bytes(data))

    def close(self) -> None:
        self._f.close()


def _media_shard(storage, tmp_path: Path, n: int = 6):
    """One media shard of ``n`` JPEGs committed through the gate (a fetcher that yields decoded images)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from mllm_pipeline.download.fetched import Fetched
    from mllm_pipeline.stages.media import materialize_shard
    from mllm_pipeline_tests.download.conftest import make_jpeg

    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(n)], "url": [f"http://h/{i}.jpg" for i in range(n)],
                             "captions": [[f"a red car number {i}"] for i in range(n)]}), raw)
    images = []
    for i in range(n):
        make_jpeg(tmp_path / f"{i}.jpg", 120 + i, 90, i)
        images.append((tmp_path / f"{i}.jpg").read_bytes())

    def fetch(rows, log):
        for r in rows:
            with Image.open(io.BytesIO(images[r["row"]])) as im:
                im.load()
                yield Fetched(r["row"], True, media=("jpg", images[r["row"]]), width=im.width, height=im.height)

    return materialize_shard(storage, dataset="cc3m", shard_key="shard-00000", shard_index=0, raw_uri=str(raw),
                             raw_version="v-test", options={}, fetch=fetch, rows_digest="rows-test")


def test_a_media_shard_whose_stored_bytes_differ_from_the_written_ones_is_refused(tmp_path):
    """At commit the gate reads ``media.tar`` back and compares it with the sha256 recorded as it was written
    (every fetcher decoded each success before writing it): one byte changed on its way to the disk, inside an
    image that still has a valid JPEG header, refuses the version. The same shard written intact commits, and the
    check run on its own (outside the gate) decodes every member."""
    from mllm_pipeline.stages.verify import verify_media_shard
    from mllm_pipeline.storage import Storage

    class Faulty(Storage):
        def open(self, rel: str, mode: str = "rb"):
            f = super().open(rel, mode)
            return _FlipOneByte(f, 2000) if "w" in mode and rel.endswith("media.tar") else f

    from mllm_pipeline.stages.gate import GATE

    faulty = Faulty(str(tmp_path / "root"), gate=GATE)
    with pytest.raises(CheckFailed) as e:
        _media_shard(faulty, tmp_path)
    assert "samples_accounted" in str(e.value) and "does not hold the bytes that were written" in str(e.value)
    assert not faulty.exists("media/cc3m/shard-00000/_manifest.json")

    storage = pipeline_storage(str(tmp_path / "root"))
    outcome = _media_shard(storage, tmp_path)
    m = storage.read_manifest("media/cc3m/shard-00000")
    assert outcome.summary["succeeded"] == 6 and len(m["tar_sha256"]) == 64
    assert m["checks"]["samples_accounted"]["passed"]
    alone = verify_media_shard(storage, "cc3m", "shard-00000")
    assert alone.passed and alone.counts.get("tar_sha256_matches") is None  # decoded, not compared
