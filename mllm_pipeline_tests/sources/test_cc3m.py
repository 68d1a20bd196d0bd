"""CC3M TSV: both layouts, every kind of bad line, real rows, shard sizes."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from mllm_pipeline.sources.cc3m import ingest_cc3m
from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw


def write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def test_plain_and_headered_files_give_the_same_rows(storage, tmp_path):
    rows = [b"a dog runs on the beach\thttp://example.com/1.jpg", b"actor performs on stage\thttps://example.com/2.jpg"]
    plain = write(tmp_path / "Train_GCC-training.tsv", rows)
    headered = write(tmp_path / "cc3m.tsv", [b"caption\turl", *rows])
    ingest_cc3m([plain], storage)
    a = read_raw(storage, "cc3m").to_pylist()
    ingest_cc3m([headered], storage)
    b = read_raw(storage, "cc3m").to_pylist()
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b] == ["cc3m-train-000000001", "cc3m-train-000000002"]
    assert [r["captions"] for r in a] == [["a dog runs on the beach"], ["actor performs on stage"]]
    assert [r["source_line"] for r in a] == [1, 2] and [r["source_line"] for r in b] == [2, 3]
    assert a[0]["media_kind"] == "image" and a[0]["dataset"] == "cc3m" and a[0]["url"] == "http://example.com/1.jpg"


def test_bad_lines_are_quarantined_with_line_and_reason(storage, tmp_path):
    path = write(
        tmp_path / "Train_GCC-training.tsv",
        [
            b"good one\thttp://x.org/1.jpg",  # 1
            b"only a caption",  # 2 wrong field count
            b"caf\xe9 on a street\thttp://x.org/3.jpg",  # 3 not UTF-8
            b"",  # 4 empty line
            b"no url here\t",  # 5
            b"three\tfields\there",  # 6
            b"relative url\timages/7.jpg",  # 7
            b"\thttp://x.org/8.jpg",  # 8 empty caption
            b"good two\thttp://x.org/9.jpg",  # 9
        ],
    )
    report = ingest_cc3m([path], storage)
    assert report.rows_in == 9 and report.rows_kept == 2
    assert report.rows_in == report.rows_kept + report.rows_quarantined
    got = {(q["line"], q["reason"]) for q in quarantine_rows(storage, "cc3m")}
    assert got == {
        (2, "wrong_field_count"),
        (3, "invalid_utf8"),
        (4, "empty_line"),
        (5, "missing_url"),
        (6, "wrong_field_count"),
        (7, "bad_url"),
        (8, "missing_caption"),
    }
    raw = {q["line"]: q for q in quarantine_rows(storage, "cc3m")}
    assert raw[3]["raw"] == b"caf\xe9 on a street\thttp://x.org/3.jpg"  # original bytes kept
    assert raw[6]["detail"] == "expected 2 fields, found 3"
    assert raw[2]["source_file"] == path and raw[2]["locator"] == "line 2"
    kept = read_raw(storage, "cc3m").to_pylist()
    assert [(r["source_line"], r["sample_id"]) for r in kept] == [(1, "cc3m-train-000000001"), (9, "cc3m-train-000000009")]


def test_line_numbers_survive_bad_lines_across_blocks(storage, tmp_path, monkeypatch):
    import mllm_pipeline.sources.delimited as delimited

    monkeypatch.setattr(delimited, "BLOCK_SIZE", 4096)
    lines = []
    for i in range(1, 3001):
        lines.append(b"broken line" if i % 97 == 0 else b"caption %d\thttp://x.org/%d.jpg" % (i, i))
    path = write(tmp_path / "train.tsv", lines)
    report = ingest_cc3m([path], storage, rows_per_shard=1000)
    kept = read_raw(storage, "cc3m")
    assert report.rows_kept == 3000 - 3000 // 97
    for r in kept.to_pylist():
        n = r["source_line"]
        assert r["captions"] == [f"caption {n}"] and r["url"] == f"http://x.org/{n}.jpg"
    assert sorted(q["line"] for q in quarantine_rows(storage, "cc3m")) == list(range(97, 3001, 97))


def test_shards_have_a_fixed_number_of_rows(storage, tmp_path):
    path = write(tmp_path / "train.tsv", [b"c %d\thttp://x.org/%d" % (i, i) for i in range(2500)])
    report = ingest_cc3m([path], storage, rows_per_shard=1000)
    assert [s["rows"] for s in report.shards] == [1000, 1000, 500]
    manifest = storage.read_manifest("raw/cc3m")
    assert manifest["rows_kept"] == 2500 and len(manifest["shards"]) == 3


def test_split_comes_from_the_file_name(storage, tmp_path):
    path = write(tmp_path / "Validation_GCC-1.1.0-Validation.tsv", [b"a cat\thttp://x.org/c.jpg"])
    ingest_cc3m([path], storage)
    row = read_raw(storage, "cc3m").to_pylist()[0]
    assert row["split"] == "validation" and row["sample_id"] == "cc3m-validation-000000001"


def test_real_alt_text_rows(storage, tmp_path, fixtures):
    """1,000 real web alt-text captions with their URLs, written in the CC3M layout, all survive unchanged."""
    t = pq.read_table(fixtures / "web_alt_text_real_1000.parquet")
    pairs = [(c, u) for c, u in zip(t.column("TEXT").to_pylist(), t.column("URL").to_pylist())]
    lines = [f"{c}\t{u}".encode() for c, u in pairs]
    path = write(tmp_path / "Train_GCC-training.tsv", lines)
    report = ingest_cc3m([path], storage)
    assert report.rows_in == 1000
    kept = {r["source_line"]: r for r in read_raw(storage, "cc3m").to_pylist()}
    for q in quarantine_rows(storage, "cc3m"):  # whatever is set aside says why, and is a real problem
        caption, url = pairs[q["line"] - 1]
        assert q["reason"] in {"missing_caption", "missing_url", "bad_url", "wrong_field_count"}, q
    for line, row in kept.items():
        assert row["captions"] == [pairs[line - 1][0]] and row["url"] == pairs[line - 1][1]
    assert report.rows_kept >= 990


def test_a_file_that_is_not_cc3m_stops_with_a_clear_message(storage, tmp_path):
    path = write(tmp_path / "other.tsv", [b"id\tname", b"1\tfoo"])
    with pytest.raises(SourceFormatError) as e:
        ingest_cc3m([path], storage)
    msg = str(e.value)
    assert path in msg and "caption<TAB>url" in msg and "'id', 'name'" in msg


def test_a_failed_run_keeps_the_previous_output(storage, tmp_path):
    good = write(tmp_path / "train.tsv", [b"a cat\thttp://x.org/c.jpg"])
    ingest_cc3m([good], storage)
    before = storage.read_manifest("raw/cc3m")
    with pytest.raises(FileNotFoundError):
        ingest_cc3m([good, str(tmp_path / "missing.tsv")], storage)
    assert storage.read_manifest("raw/cc3m") == before
    assert storage.listdir("raw/cc3m") == sorted(["_manifest.json", before["version"]])


def test_shard_digests_follow_the_values_not_the_layout():
    """A shard's digests are the same however its table is chunked or encoded, and change only with the columns
    they cover: a URL edit changes the media digest, not the captions digest."""
    import pyarrow as pa

    from mllm_pipeline.sources.common import CAPTION_COLUMNS, LABEL, MEDIA_COLUMNS, rows_digests

    kinds = {"media": MEDIA_COLUMNS, "captions": CAPTION_COLUMNS}
    t = pa.table({"sample_id": ["a", "b", "c"], "url": ["http://x/1", None, "http://x/3"],
                  "captions": [["one cat"], ["two", "dogs"], []], "split": pa.array(["train"] * 3).cast(LABEL),
                  "clip_start_s": [None, 1.5, 2.0]})
    base = rows_digests(t, kinds)
    assert rows_digests(pa.concat_tables([t.slice(0, 1), t.slice(1)]), kinds) == base
    assert rows_digests(t.set_column(3, "split", pa.array(["train"] * 3)), kinds) == base  # not dictionary-encoded
    edited = rows_digests(t.set_column(1, "url", pa.array(["http://x/1", None, "http://x/4"])), kinds)
    assert edited["media"] != base["media"] and edited["captions"] == base["captions"]
    moved = rows_digests(t.set_column(2, "captions", pa.array([["one"], ["cat", "two", "dogs"], []])), kinds)
    assert moved["captions"] != base["captions"]  # the same words split differently are other captions
    assert rows_digests(t.slice(0, 2), kinds) != base
