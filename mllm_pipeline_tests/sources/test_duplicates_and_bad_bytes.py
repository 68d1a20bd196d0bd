"""Faults real dumps have, found where they enter: a key repeated in or across webdataset tars (the pixparse/cc3m-wds
layout: consecutive ``<key>.jpg`` / ``<key>.txt`` / ``<key>.json`` members), the same InternVid clip twice
(``YoutubeID``, ``Start_timestamp``, ``End_timestamp`` as in InternVid-10M-FLT's JSONL), bytes that are not UTF-8
inside a JSON string past the first rows, and JSON objects that name a key twice (MSR-VTT's ``sentences`` entries,
COCO's ``annotations``). Each is set aside with its reason and the row accounting still adds up."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pytest

from mllm_pipeline.sources.cc3m_wds import ingest_cc3m_wds
from mllm_pipeline.sources.coco import ingest_coco
from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.sources.internvid import ingest_internvid
from mllm_pipeline.sources.msrvtt import ingest_msrvtt
from mllm_pipeline.stages.verify import verify_raw
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw

log = logging.getLogger(__name__)


def _verified(st, dataset, prefix=None):
    v = verify_raw(st, dataset, prefix)
    assert not v.problems, v.problems


def _tar(path, samples):
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for key, colour, caption in samples:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), colour).save(buf, "JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_webdataset_key_repeated_in_a_tar_or_across_tars(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    _tar(d / "cc3m-train-0000.tar", [("000000000", "red", "a red square"), ("000000001", "blue", "a blue square"),
                                     ("000000000", "green", "a green square")])  # the key again, another image
    _tar(d / "cc3m-train-0001.tar", [("000000001", "white", "a white square"), ("000000002", "black", "a black square")])
    st = Storage(str(tmp_path / "root"))
    rep = ingest_cc3m_wds(str(d), st, logger=log)
    assert rep.rows_kept == 3 and rep.quarantined == {"duplicate_id": 2}
    raw = {r["sample_id"]: r["captions"] for r in read_raw(st, "cc3m_wds", "raw/cc3m_wds").to_pylist()}
    assert raw["cc3m-wds-train-000000000"] == ["a red square"] and raw["cc3m-wds-train-000000001"] == ["a blue square"]
    _verified(st, "cc3m_wds", "raw/cc3m_wds")


def _clip(yid, start, end, caption):
    return json.dumps({"YoutubeID": yid, "Start_timestamp": start, "End_timestamp": end, "Caption": caption,
                       "Aesthetic_Score": 4.5, "UMT_Score": 0.4}).encode()


def test_internvid_the_same_clip_twice_and_bytes_that_are_not_utf8(tmp_path):
    lines = [_clip(f"vid{i % 7:08d}", f"00:00:{i % 50:02d}.000", f"00:01:{i % 50:02d}.500", f"someone does thing {i}")
             for i in range(300)]  # 300 distinct clips of 7 videos
    lines.append(lines[10])  # the very same line again
    lines.append(_clip("vid00000003", "00:00:03.000", "00:01:03.500", "another caption for an existing clip"))
    lines[250] = lines[250].replace(b"someone does", b"someone \xff\xfe does")  # past the first block's rows
    p = tmp_path / "InternVid-10M-flt.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    st = Storage(str(tmp_path / "root"))
    rep = ingest_internvid([str(p)], st, logger=log)
    assert rep.quarantined == {"duplicate_id": 2, "invalid_utf8": 1} and rep.rows_kept == 299
    q = {(r["line"], r["reason"]) for r in quarantine_rows(st, "internvid")}
    assert q == {(301, "duplicate_id"), (302, "duplicate_id"), (251, "invalid_utf8")}
    caps = [c for cs in read_raw(st, "internvid")["captions"].to_pylist() for c in cs]
    assert all(c.isprintable() for c in caps)  # nothing invalid reached the raw shards
    _verified(st, "internvid")


def test_json_objects_that_name_a_key_twice(tmp_path):
    # MSR-VTT official layout: sentences {caption, video_id, sen_id}; six of twelve name "caption" twice
    sentences = []
    for k in range(12):
        body = f'"caption": "a man talks {k}", "video_id": "video{k % 2}", "sen_id": {k}'
        if k < 6:
            body = f'"caption": "first {k}", ' + body
        sentences.append("{" + body + "}")
    videos = ",".join(json.dumps({"video_id": f"video{i}", "split": "train", "url": "https://www.youtube.com/watch?v=x",
                                  "start time": 1.0, "end time": 9.0, "category": 1, "id": i}) for i in range(2))
    ann = tmp_path / "train_val_videodatainfo.json"
    ann.write_text('{"info": {}, "videos": [' + videos + '], "sentences": [' + ",".join(sentences) + "]}")
    st = Storage(str(tmp_path / "root"))
    rep = ingest_msrvtt([str(ann)], st, logger=log)
    assert rep.quarantined == {"repeated_key": 6}
    raws = [r["raw"] for r in quarantine_rows(st, "msrvtt")]
    assert all(b'"first ' in r and b'"a man talks ' in r for r in raws)  # both values kept in the quarantine
    _verified(st, "msrvtt")

    coco = tmp_path / "captions_train2017.json"
    coco.write_text('{"images": [{"id": 1, "file_name": "000000000001.jpg"}], "annotations": ['
                    '{"id": 1, "image_id": 1, "caption": "a cat"}, {"id": 2, "image_id": 1, "image_id": 1, "caption": "x"}]}')
    st = Storage(str(tmp_path / "root2"))
    rep = ingest_coco([str(coco)], st, logger=log)
    assert rep.quarantined == {"repeated_key": 1} and rep.rows_kept == 1
    _verified(st, "coco")

    top = tmp_path / "captions_val2017.json"
    top.write_text('{"images": [], "annotations": [], "images": [{"id": 1, "file_name": "a.jpg"}]}')
    with pytest.raises(SourceFormatError, match=r"the key\(s\) \['images'\] more than once"):
        ingest_coco([str(top)], Storage(str(tmp_path / "root3")))


def test_a_truncated_tar_costs_its_own_tail_and_names_the_tar(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    _tar(d / "cc3m-train-0000.tar", [(f"{k:09d}", "red", f"a square {k}") for k in range(6)])
    _tar(d / "cc3m-train-0001.tar", [(f"{k:09d}", "blue", f"a square {k}") for k in range(6, 9)])
    whole = (d / "cc3m-train-0000.tar").read_bytes()
    (d / "cc3m-train-0000.tar").write_bytes(whole[: len(whole) // 2])  # breaks off inside a sample
    st = Storage(str(tmp_path / "root"))
    rep = ingest_cc3m_wds(str(d), st, logger=log)
    assert rep.quarantined == {"truncated_tar": 1} and 3 <= rep.rows_kept < 9
    q = quarantine_rows(st, "cc3m_wds", "raw/cc3m_wds")
    assert q[0]["source_file"].endswith("cc3m-train-0000.tar") and q[0]["locator"] == "key (truncated)"
    ids = read_raw(st, "cc3m_wds", "raw/cc3m_wds")["sample_id"].to_pylist()
    assert {f"cc3m-wds-train-{k:09d}" for k in range(6, 9)} <= set(ids)  # the next tar is read as usual
    _verified(st, "cc3m_wds", "raw/cc3m_wds")


def test_an_annotation_whose_lists_are_not_lists_names_the_key(tmp_path):
    p = tmp_path / "train_val_videodatainfo.json"
    p.write_text(json.dumps({"info": {}, "videos": {"video0": {}}, "sentences": []}))
    with pytest.raises(SourceFormatError, match="'videos' holding a JSON dict"):
        ingest_msrvtt([str(p)], Storage(str(tmp_path / "root")))
