"""InternVid JSONL (timestamps, thresholds, grouping per video) and CC3M webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import pytest

from mllm_pipeline.sources.cc3m_wds import ingest_cc3m_wds
from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.sources.internvid import ingest_internvid, parse_timestamp
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw


def clip(yid: str, start: str, end: str, caption: str = "a woman using a laptop", aes: float = 5.0, umt: float = 0.45) -> bytes:
    return json.dumps({"YoutubeID": yid, "Start_timestamp": start, "End_timestamp": end, "Caption": caption,
                       "Aesthetic_Score": aes, "UMT_Score": umt}).encode()


def test_timestamps():
    assert parse_timestamp(["00:03:10.567", "01:00:00", "00:61:00.000", "3:10", "x"]).to_pylist() == [190.567, 3600.0, None, None, None]


def test_clips_grouped_per_video_and_bad_lines_quarantined(storage, tmp_path):
    lines = [
        clip("HdYoyzCSWyw", "00:03:10.567", "00:03:11.200", "woman using a laptop"),  # 1
        clip("AAAAAAAAAAA", "00:00:01.000", "00:00:04.000", "a dog"),  # 2
        b'{"YoutubeID": "broken", ',  # 3 not JSON
        clip("HdYoyzCSWyw", "00:00:05.000", "00:00:07.500", "earlier clip of the same video"),  # 4
        clip("AAAAAAAAAAA", "00:00:09.000", "00:00:08.000"),  # 5 end before start
        clip("BBBBBBBBBBB", "00:61:00.000", "00:62:00.000"),  # 6 bad timestamp
        b'{"YoutubeID": "CCCCCCCCCCC", "Caption": "no times"}',  # 7 missing fields
        b"{\"YoutubeID\": \"DDDDDDDDDDD\", \"Caption\": \"caf\xe9\"}",  # 8 not UTF-8
        clip("AAAAAAAAAAA", "00:00:10.000", "00:00:12.000", "a dog again"),  # 9
    ]
    path = tmp_path / "InternVid-10M-flt.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = ingest_internvid([str(path)], storage)
    rows = read_raw(storage, "internvid").to_pylist()
    assert [(r["group_id"], r["clip_start_s"], r["captions"][0]) for r in rows] == [
        ("AAAAAAAAAAA", 1.0, "a dog"),
        ("AAAAAAAAAAA", 10.0, "a dog again"),
        ("HdYoyzCSWyw", 5.0, "earlier clip of the same video"),
        ("HdYoyzCSWyw", 190.567, "woman using a laptop"),
    ]
    h = rows[3]
    assert h["sample_id"] == "internvid-HdYoyzCSWyw-190567-191200" and h["source_line"] == 1
    assert h["url"] == "https://www.youtube.com/watch?v=HdYoyzCSWyw"
    assert h["clip_end_s"] == 191.2 and abs(h["duration_s"] - 0.633) < 1e-9
    assert h["src_aesthetic_score"] == 5.0 and h["src_start_timestamp"] == "00:03:10.567"
    assert sorted((q["line"], q["reason"]) for q in quarantine_rows(storage, "internvid")) == [
        (3, "invalid_json"), (5, "end_before_start"), (6, "bad_timestamp"), (7, "missing_field"), (8, "invalid_utf8")]
    assert report.extra["videos"] == 2 and report.rows_in == 9


def test_score_thresholds(storage, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join([clip("AAAAAAAAAAA", "00:00:01", "00:00:02", aes=3.0), clip("AAAAAAAAAAA", "00:00:03", "00:00:04", umt=0.2),
                                 clip("AAAAAAAAAAA", "00:00:05", "00:00:06")]) + b"\n")
    report = ingest_internvid([str(path)], storage, min_aesthetic_score=4.0, min_umt_score=0.3)
    assert report.rows_kept == 1 and report.quarantined == {"below_aesthetic_threshold": 1, "below_umt_threshold": 1}


def test_a_video_never_spans_two_shards(storage, tmp_path):
    lines = []
    for k in range(7):
        for v in range(30):
            lines.append(clip(f"video{v:06d}", f"00:00:{k:02d}.000", f"00:00:{k:02d}.900"))
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = ingest_internvid([str(path)], storage, rows_per_shard=10)
    seen: dict[str, str] = {}
    for shard in report.shards:
        assert shard["rows"] % 7 == 0  # whole videos only
    from mllm_pipeline.sources.common import read_raw_shards
    import pyarrow.parquet as pq

    for uri in read_raw_shards(storage, "internvid"):
        for g in set(pq.read_table(uri).column("group_id").to_pylist()):
            assert g not in seen
            seen[g] = uri
    assert len(seen) == 30


def test_url_template(storage, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(clip("AAAAAAAAAAA", "00:00:01", "00:00:02") + b"\n")
    ingest_internvid([str(path)], storage, url_template="http://mirror.local/yt/{id}.mp4")
    assert read_raw(storage, "internvid").column("url").to_pylist() == ["http://mirror.local/yt/AAAAAAAAAAA.mp4"]


def make_tar(path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for name, data in s.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cc3m_webdataset_shards(storage, tmp_path):
    d = tmp_path / "cc3m-wds"
    d.mkdir()
    make_tar(d / "cc3m-train-0000.tar", [
        {"000000001.jpg": b"\xff\xd8jpegbytes", "000000001.txt": b"a red bus", "000000001.json": json.dumps({"url": "http://x/1.jpg", "width": 400, "height": 300}).encode()},
        {"000000002.jpg": b"\xff\xd8jpegbytes"},  # no caption
        {"000000003.txt": b"caption without an image"},
    ])
    make_tar(d / "cc3m-validation-0000.tar", [{"000000009.jpg": b"\xff\xd8", "000000009.txt": b"a cat"}])
    (d / "README.md").write_text("not a shard")
    report = ingest_cc3m_wds(str(d), storage)
    rows = read_raw(storage, "cc3m", prefix="raw/cc3m_wds").to_pylist()
    assert [(r["sample_id"], r["split"], r["captions"]) for r in rows] == [
        ("cc3m-wds-train-000000001", "train", ["a red bus"]), ("cc3m-wds-validation-000000009", "validation", ["a cat"])]
    assert rows[0]["src_width"] == 400 and rows[0]["url"] == "http://x/1.jpg"
    with fsspec.open(rows[0]["path"], "rb") as f:  # the path opens the image inside its tar
        assert f.read() == b"\xff\xd8jpegbytes"
    assert report.quarantined == {"missing_caption": 1, "missing_image": 1}
    assert {q["locator"] for q in quarantine_rows(storage, "cc3m", prefix="raw/cc3m_wds")} == {"key 000000002", "key 000000003"}


def test_cc3m_webdataset_wrong_directory(storage, tmp_path):
    (tmp_path / "shard-0.tar").write_bytes(b"")
    with pytest.raises(SourceFormatError) as e:
        ingest_cc3m_wds(str(tmp_path), storage)
    assert "cc3m-train-NNNN.tar" in str(e.value) and "shard-0.tar" in str(e.value)


def test_score_thresholds_are_not_faults(storage, tmp_path):
    """Clips under the configured thresholds are set aside on purpose: a threshold that keeps 1 clip in 5 commits,
    where 4 in 5 unreadable lines would be refused by the quarantine ceiling."""
    from mllm_pipeline.stages.verify.raw import verify_quarantine_ceiling

    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join([clip("AAAAAAAAAAA", f"00:00:0{i}", f"00:00:0{i + 1}", umt=0.1 if i else 0.5)
                                 for i in range(5)]) + b"\n")
    report = ingest_internvid([str(path)], storage, min_umt_score=0.4)
    assert report.rows_kept == 1 and report.quarantined == {"below_umt_threshold": 4}
    verdict = verify_quarantine_ceiling(storage, "raw/internvid")
    assert not verdict.problems and verdict.counts["set_aside_as_faults"] == 0
