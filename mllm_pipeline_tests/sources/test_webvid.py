"""WebVid CSV: the real rows, ISO durations, duplicates, bad rows, wrong headers."""

from __future__ import annotations

import pytest

from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.sources.webvid import ingest_webvid, parse_iso_duration
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw

HEADER = "videoid,name,page_idx,page_dir,duration,contentUrl\n"


def test_real_rows(storage, fixtures):
    report = ingest_webvid([str(fixtures / "webvid_real_20.csv")], storage)
    assert (report.rows_in, report.rows_kept, report.rows_quarantined) == (20, 20, 0)
    rows = read_raw(storage, "webvid").to_pylist()
    first = rows[0]
    assert first["sample_id"] == "webvid-1053841541"
    assert first["captions"] == ["Travel blogger shoot a story on top of mountains. young man holds camera in forest."]
    assert first["duration_s"] == 17.0 and first["src_duration"] == "PT00H00M17S"
    assert first["src_page_dir"] == "027701_027750" and first["src_page_idx"] == 27732
    assert first["url"].startswith("https://ak.picdn.net/shutterstock/videos/1053841541/")
    assert all(r["media_kind"] == "video" for r in rows)
    # quoted captions with commas survive intact
    assert any(r["captions"] == ["Moroccan flag waving in the wind in medieval town essaouira, morocco"] for r in rows)


@pytest.mark.parametrize(
    "text,seconds",
    [("PT00H00M09S", 9.0), ("PT01H02M03S", 3723.0), ("PT1M5.5S", 65.5), ("PT30S", 30.0), ("P1DT1H", 90000.0),
     ("PT0XH", None), ("", None), ("PT", None), ("9", None), ("00:00:09", None)],
)
def test_iso_durations(text, seconds):
    assert parse_iso_duration([text]).to_pylist() == [seconds]


def test_duplicates_and_bad_rows(storage, tmp_path):
    path = tmp_path / "results_10M_train.csv"
    path.write_text(
        HEADER
        + "11,first caption,1,000001_000050,PT00H00M05S,http://x.org/11.mp4\n"  # 2
        + "12,\"a caption, with a comma\",1,000001_000050,PT00H00M06S,http://x.org/12.mp4\n"  # 3
        + "11,updated caption,1,000001_000050,PT00H00M05S,http://x.org/11.mp4\n"  # 4 duplicate
        + "13,bad duration,1,000001_000050,PT0XH,http://x.org/13.mp4\n"  # 5
        + "14,no url,1,000001_000050,PT00H00M05S,\n"  # 6
        + "15,too few fields,1\n"  # 7
        + "abc,bad id,1,000001_000050,PT00H00M05S,http://x.org/a.mp4\n"  # 8
        + "16,,1,000001_000050,PT00H00M05S,http://x.org/16.mp4\n"  # 9 empty caption
        + "11,third copy,1,000001_000050,PT00H00M05S,http://x.org/11.mp4\n"  # 10 duplicate
    )
    report = ingest_webvid([str(path)], storage)
    assert report.rows_in == 9 and report.rows_kept == 2 and report.extra["duplicate_videoids"] == 2
    got = sorted((q["line"], q["reason"]) for q in quarantine_rows(storage, "webvid"))
    assert got == [(4, "duplicate_id"), (5, "bad_duration"), (6, "missing_url"), (7, "wrong_field_count"),
                   (8, "bad_id"), (9, "missing_caption"), (10, "duplicate_id")]
    kept = read_raw(storage, "webvid").to_pylist()
    assert [r["captions"] for r in kept] == [["first caption"], ["a caption, with a comma"]]


def test_duplicates_across_files_and_blocks(storage, tmp_path, monkeypatch):
    import mllm_pipeline.sources.delimited as delimited

    monkeypatch.setattr(delimited, "BLOCK_SIZE", 2048)
    files = []
    for f in range(2):
        path = tmp_path / f"part{f}.csv"
        lines = [HEADER] + [f"{i},caption {i},1,d,PT5S,http://x.org/{i}.mp4\n" for i in range(f * 500, f * 500 + 1000)]
        path.write_text("".join(lines))
        files.append(str(path))
    report = ingest_webvid(files, storage)
    assert report.rows_kept == 1500 and report.quarantined == {"duplicate_id": 500}
    ids = read_raw(storage, "webvid").column("src_videoid").to_pylist()
    assert sorted(ids) == list(range(1500))


def test_header_without_required_columns_names_them(storage, tmp_path):
    path = tmp_path / "webvid.csv"
    path.write_text("videoid,caption,url\n1,a,http://x.org/1.mp4\n")
    with pytest.raises(SourceFormatError) as e:
        ingest_webvid([str(path)], storage)
    msg = str(e.value)
    assert str(path) in msg and "contentUrl" in msg and "duration" in msg and "'caption'" in msg


def test_header_order_does_not_matter(storage, tmp_path):
    path = tmp_path / "results_2M_train.csv"
    path.write_text("videoid,contentUrl,duration,page_dir,name\n7,http://x.org/7.mp4,PT00H00M12S,000001_000050,a fox\n")
    ingest_webvid([str(path)], storage)
    row = read_raw(storage, "webvid").to_pylist()[0]
    assert row["duration_s"] == 12.0 and row["captions"] == ["a fox"] and row["src_page_idx"] is None
