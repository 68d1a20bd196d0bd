"""MSR-VTT (official, flat, category-only) and COCO captions (join, orphans, local images)."""

from __future__ import annotations

import json

import pytest

from mllm_pipeline.sources.coco import ingest_coco
from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.sources.msrvtt import ingest_msrvtt
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw


def official_msrvtt(n_videos: int = 4, captions_each: int = 20) -> dict:
    splits = ["train", "train", "validate", "test"]
    videos = [
        {"category": i % 20, "url": f"https://www.youtube.com/watch?v=vid{i:08d}", "video_id": f"video{i}",
         "start time": 10.0 + i, "end time": 20.5 + i, "split": splits[i % 4], "id": i}
        for i in range(n_videos)
    ]
    sentences = [
        {"caption": f"caption {k} of video {i}", "video_id": f"video{i}", "sen_id": i * captions_each + k}
        for k in range(captions_each) for i in range(n_videos)
    ]
    return {"info": {"year": "2016", "version": "1.0"}, "videos": videos, "sentences": sentences}


def test_msrvtt_official_one_row_per_video_with_all_captions(storage, tmp_path):
    doc = official_msrvtt()
    doc["sentences"].append({"caption": "orphan", "video_id": "video999", "sen_id": 10_000})
    path = tmp_path / "train_val_videodatainfo.json"
    path.write_text(json.dumps(doc))
    report = ingest_msrvtt([str(path)], storage)
    rows = read_raw(storage, "msrvtt").to_pylist()
    assert len(rows) == 4 and report.extra["captions"] == 80
    v0 = next(r for r in rows if r["sample_id"] == "msrvtt-video0")
    assert v0["captions"] == [f"caption {k} of video 0" for k in range(20)]
    assert (v0["clip_start_s"], v0["clip_end_s"], v0["duration_s"]) == (10.0, 20.5, 10.5)
    assert v0["url"] == "https://www.youtube.com/watch?v=vid00000000" and v0["split"] == "train"
    assert report.extra["videos_by_split"] == {"train": 2, "validate": 1, "test": 1}
    q = quarantine_rows(storage, "msrvtt")
    assert [(r["reason"], r["locator"]) for r in q] == [("caption_for_unknown_video", "sentences[80]")]
    assert report.rows_in == report.rows_kept + report.rows_quarantined == 5


def test_msrvtt_local_videos_dir(storage, tmp_path):
    videos = tmp_path / "videos" / "all"
    videos.mkdir(parents=True)
    for i in (0, 1, 2):
        (videos / f"video{i}.mp4").write_bytes(b"x")
    path = tmp_path / "train_val_videodatainfo.json"
    path.write_text(json.dumps(official_msrvtt()))
    ingest_msrvtt([str(path)], storage, videos_dir=str(videos))
    rows = read_raw(storage, "msrvtt").to_pylist()
    assert sorted(r["path"] for r in rows) == [str(videos / f"video{i}.mp4") for i in (0, 1, 2)]
    assert all(r["url"] is None and r["clip_start_s"] is None for r in rows)
    assert [(q["reason"], q["locator"]) for q in quarantine_rows(storage, "msrvtt")] == [("media_file_missing", "videos[3]")]


def test_msrvtt_flat_list(storage, tmp_path):
    flat = [{"video": "video9770.mp4", "caption": "a person is connecting something to system", "duration": 10.8},
            {"video": "video9771.mp4", "caption": "a little girl does gymnastics", "duration": 13.78},
            {"video": "video9770.mp4", "caption": "someone plugs in a cable", "duration": 10.8},
            {"caption": "no video field"}]
    path = tmp_path / "msrvtt_flat.json"
    path.write_text(json.dumps(flat))
    report = ingest_msrvtt([str(path)], storage)
    rows = {r["sample_id"]: r for r in read_raw(storage, "msrvtt").to_pylist()}
    assert rows["msrvtt-video9770"]["captions"] == ["a person is connecting something to system", "someone plugs in a cable"]
    assert rows["msrvtt-video9771"]["duration_s"] == 13.78
    assert report.quarantined == {"missing_field": 1}


def test_msrvtt_categories_without_captions_stops_and_says_where_they_are(storage, tmp_path):
    doc = official_msrvtt()
    del doc["sentences"]
    path = tmp_path / "MSRVTT_category.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SourceFormatError) as e:
        ingest_msrvtt([str(path)], storage)
    msg = str(e.value)
    assert str(path) in msg and "captions are missing" in msg and "train_val_videodatainfo.json" in msg


def test_msrvtt_invalid_json_names_the_position(storage, tmp_path):
    path = tmp_path / "videodatainfo.json"
    path.write_text('{"videos": [1, 2,}')
    with pytest.raises(SourceFormatError) as e:
        ingest_msrvtt([str(path)], storage)
    assert str(path) in str(e.value) and "line 1, column" in str(e.value)


def coco_doc(split: str = "train") -> dict:
    images = [
        {"license": 3, "file_name": f"{i:012d}.jpg", "coco_url": f"http://images.cocodataset.org/{split}2017/{i:012d}.jpg",
         "height": 360, "width": 640, "date_captured": "2013-11-14 11:18:45", "flickr_url": "http://farm9.example/x.jpg", "id": i}
        for i in (391895, 522418, 184613)
    ]
    anns = []
    aid = 1
    for im, n in ((391895, 5), (522418, 7)):
        for k in range(n):
            anns.append({"image_id": im, "id": aid, "caption": f"image {im} caption {k} "})
            aid += 1
    anns.append({"image_id": 999, "id": aid, "caption": "a caption for an image that is not in the file"})
    anns.reverse()
    return {"info": {"year": 2017}, "licenses": [], "images": images, "annotations": anns}


def test_coco_joins_images_and_reports_missing_ones(storage, tmp_path):
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(coco_doc()))
    report = ingest_coco([str(path)], storage)
    rows = {r["sample_id"]: r for r in read_raw(storage, "coco").to_pylist()}
    assert set(rows) == {"coco-391895", "coco-522418"}
    assert rows["coco-391895"]["captions"] == [f"image 391895 caption {k}" for k in range(5)]  # annotation-id order, trimmed
    assert len(rows["coco-522418"]["captions"]) == 7
    assert rows["coco-391895"]["url"] == "http://images.cocodataset.org/train2017/000000391895.jpg"
    assert rows["coco-391895"]["src_width"] == 640 and rows["coco-391895"]["split"] == "train"
    assert report.extra["captions_image_missing"] == 1 and report.extra["captions"] == 12
    reasons = sorted((q["reason"], q["locator"]) for q in quarantine_rows(storage, "coco"))
    assert reasons == [("image_missing", "annotations[0]"), ("no_captions", "images[2]")]
    assert report.rows_in == report.rows_kept + report.rows_quarantined


def test_coco_local_images_dir(storage, tmp_path):
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    (tmp_path / "coco" / "val2017" / "000000391895.jpg").write_bytes(b"x")
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(coco_doc("val")))
    ingest_coco([str(path)], storage, images_dir=str(tmp_path / "coco"))
    rows = read_raw(storage, "coco").to_pylist()
    assert [(r["path"], r["split"], r["url"]) for r in rows] == [(str(tmp_path / "coco" / "val2017" / "000000391895.jpg"), "val", None)]
    assert ("media_file_missing", "images[1]") in {(q["reason"], q["locator"]) for q in quarantine_rows(storage, "coco")}


def test_coco_wrong_structure(storage, tmp_path):
    path = tmp_path / "instances_train2017.json"
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(SourceFormatError) as e:
        ingest_coco([str(path)], storage)
    assert "'annotations'" in str(e.value) and str(path) in str(e.value)
