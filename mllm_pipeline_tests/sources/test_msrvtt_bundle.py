"""MSR-VTT as users prepare it: the 9k / 7k / 1k-A split schemes from the CLIP4Clip bundle, its category-only
variant, MSRVTT-QA on the videos' rows, and bad split-list / QA lines set aside with file, line and reason."""

from __future__ import annotations

import json

import pytest

from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.sources.msrvtt import check_scheme, ingest_msrvtt
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw
from mllm_pipeline_tests.sources.msrvtt_bundle import JSFUSION, N_TEST, N_TRAIN, N_VALIDATE, jsfusion_sentence, write_bundle


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "msrvtt")


def _ingest(storage, b, scheme, qa=False, data="data"):
    lists = {} if scheme == "official" else {"train_list": str(b[scheme.split("-")[0]]), "test_list": str(b["test"])}
    qa_paths = [str(b[f"qa_{s}"]) for s in ("train", "val", "test")] if qa else None
    return ingest_msrvtt([str(b[data])], storage, split_scheme=scheme, qa_paths=qa_paths, **lists)


@pytest.mark.parametrize("scheme, by_split, outside", [
    ("official", {"train": N_TRAIN, "validate": N_VALIDATE, "test": N_TEST}, 0),
    ("9k-1kA", {"train": N_TRAIN + N_VALIDATE + N_TEST - len(JSFUSION), "test": len(JSFUSION)}, 0),
    ("7k-1kA", {"train": N_TRAIN + N_VALIDATE, "test": len(JSFUSION)}, N_TEST - len(JSFUSION)),
])
def test_split_schemes_give_the_documented_counts(storage, bundle, scheme, by_split, outside):
    report = _ingest(storage, bundle, scheme)
    rows = {r["sample_id"]: r for r in read_raw(storage, "msrvtt").to_pylist()}
    assert report.extra["videos_by_split"] == by_split
    counted = {}
    for r in rows.values():
        counted[r["split"]] = counted.get(r["split"], 0) + 1
    assert counted == by_split
    q = quarantine_rows(storage, "msrvtt")
    assert [r["reason"] for r in q] == ["not_in_split_lists"] * outside
    assert report.rows_in == report.rows_kept + report.rows_quarantined == N_TRAIN + N_VALIDATE + N_TEST
    if scheme == "official":
        assert all(r["eval_caption"] is None for r in rows.values()) and "split_lists" not in report.extra
        return
    assert report.extra["videos_outside_scheme"] == outside and report.extra["eval_captions"] == len(JSFUSION)
    for i in JSFUSION:  # the 1k-A test videos: the JSFusion sentence is the evaluation caption, first, not repeated
        r = rows[f"msrvtt-video{i}"]
        assert r["split"] == "test" and r["eval_caption"] == jsfusion_sentence(i)
        assert r["captions"][0] == jsfusion_sentence(i) and len(r["captions"]) == 20 and len(set(r["captions"])) == 20
    other_test = [i for i in range(N_TRAIN + N_VALIDATE, N_TRAIN + N_VALIDATE + N_TEST) if i not in JSFUSION]
    if scheme == "9k-1kA":  # official test videos in the 9k list are training data under this scheme
        assert all(rows[f"msrvtt-video{i}"]["split"] == "train" for i in other_test)
    else:
        assert not any(f"msrvtt-video{i}" in rows for i in other_test)
        assert sorted(r["locator"] for r in q) == sorted(f"videos[{i}]" for i in other_test)
    assert all(r["eval_caption"] is None for r in rows.values() if r["split"] == "train")
    lists = report.extra["split_lists"]
    assert lists["test"]["videos"] == len(JSFUSION) and lists["train"]["videos"] == by_split["train"]


def test_bad_split_list_lines_are_set_aside_with_file_line_and_reason(storage, bundle):
    with bundle["9k"].open("a") as f:
        f.write("video999\n"        # line 28: not in the annotation
                "video3,extra\n"    # line 29: malformed (two fields)
                "video3\n"          # line 30: repeated
                "clip7\n"           # line 31: not an MSR-VTT id
                f"video{JSFUSION[0]}\n")  # line 32: also in the test list
    with bundle["test"].open("a") as f:
        f.write("4,ret4,msr1234\n")  # line 6: malformed
    report = _ingest(storage, bundle, "9k-1kA")
    q = [(r["source_file"], r["line"], r["reason"]) for r in quarantine_rows(storage, "msrvtt")]
    nine_k, test = str(bundle["9k"]), str(bundle["test"])
    assert sorted(q) == sorted([(test, 6, "wrong_field_count"), (nine_k, 28, "unknown_video"), (nine_k, 29, "wrong_field_count"),
                                (nine_k, 30, "duplicate_id"), (nine_k, 31, "bad_id"), (nine_k, 32, "in_test_list")])
    assert report.extra["videos_by_split"] == {"train": 26, "test": 4}  # the good lines still apply
    assert report.extra["split_lists"]["train"]["set_aside"] == 5
    assert report.rows_in == report.rows_kept + report.rows_quarantined == 30 + 6
    raws = {r["line"]: r["raw"] for r in quarantine_rows(storage, "msrvtt")}
    assert raws[28] == b"video999" and raws[6] == b"4,ret4,msr1234"


def test_split_list_without_its_header_names_the_file(storage, bundle):
    bundle["test"].write_text("video1,a sentence\n")
    with pytest.raises(SourceFormatError) as e:
        _ingest(storage, bundle, "9k-1kA")
    assert str(bundle["test"]) in str(e.value) and "video_id, sentence" in str(e.value)


def test_scheme_options_are_checked_before_reading():
    with pytest.raises(ValueError, match="needs test_list"):
        check_scheme("9k-1kA", "MSRVTT_train.9k.csv", None)
    with pytest.raises(ValueError, match="looks like the 7k list"):
        check_scheme("9k-1kA", "/d/MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv")
    with pytest.raises(ValueError, match="split_scheme 'official'"):
        check_scheme("official", "MSRVTT_train.9k.csv", None)
    with pytest.raises(ValueError, match="one of official, 9k-1kA, 7k-1kA"):
        check_scheme("1kA", None, None)


def test_category_only_json_gives_the_jsfusion_sentences_and_says_where_the_rest_is(tmp_path, storage):
    b = write_bundle(tmp_path / "cat", with_sentences=False)
    with pytest.raises(SourceFormatError, match="captions are missing"):  # official scheme: nothing to ingest
        _ingest(storage, b, "official")
    report = _ingest(storage, b, "9k-1kA")
    rows = read_raw(storage, "msrvtt").to_pylist()
    assert sorted((r["sample_id"], r["captions"], r["eval_caption"]) for r in rows) == sorted(
        (f"msrvtt-video{i}", [jsfusion_sentence(i)], jsfusion_sentence(i)) for i in JSFUSION)
    q = quarantine_rows(storage, "msrvtt")
    assert [r["reason"] for r in q] == ["train_captions_missing"] * 26
    assert "MSRVTT_data.json" in q[0]["detail"]
    assert "MSRVTT_data.json" in report.extra["note"] and "26 training videos" in report.extra["note"]
    assert report.rows_in == report.rows_kept + report.rows_quarantined


def test_msrvtt_qa_rides_on_the_videos_rows_with_its_own_split(storage, bundle):
    report = _ingest(storage, bundle, "9k-1kA", qa=True)
    rows = {r["sample_id"]: r for r in read_raw(storage, "msrvtt").to_pylist()}
    assert report.extra["qa_by_split"] == {"train": {"questions": 40, "set_aside": 0}, "val": {"questions": 4, "set_aside": 0},
                                           "test": {"questions": 16, "set_aside": 0}}
    v0 = rows["msrvtt-video0"]["qa"]
    assert [(q["question"], q["answer"], q["split"]) for q in v0] == [
        ("what is the person in video 0 doing 0?", "man", "train"), ("what is the person in video 0 doing 1?", "cook", "train")]
    assert {q["split"] for q in rows["msrvtt-video23"]["qa"]} == {"test"} and rows["msrvtt-video23"]["split"] == "train"
    # the 4 validate videos' and 4 non-JSFusion test videos' questions are on videos the 9k scheme trains on
    assert report.extra["qa_eval_questions_on_train_videos"] == 4 + 2 * (N_TEST - len(JSFUSION))
    assert sum(len(r["qa"]) for r in rows.values()) == 60


def test_bad_qa_rows_are_set_aside_and_questions_of_set_aside_videos_too(storage, bundle):
    test_qa = json.loads(bundle["qa_test"].read_text())
    test_qa += [{"question": "what is shown?", "answer": "dog", "video_id": 999, "id": 900, "category_id": 1},
                {"question": "what is shown?", "video_id": 23, "id": 901, "category_id": 1}]
    bundle["qa_test"].write_text(json.dumps(test_qa))
    report = _ingest(storage, bundle, "7k-1kA", qa=True)
    q = [(r["source_file"], r["locator"], r["reason"]) for r in quarantine_rows(storage, "msrvtt")]
    qa_q = [x for x in q if x[0] == str(bundle["qa_test"])]
    outside = [i for i in range(22, 30) if i not in JSFUSION]
    # questions 0..15 of test_qa.json are about videos 22..29 in order, two each
    expected = [(str(bundle["qa_test"]), f"[{2 * (i - 22) + k}]", "qa_for_set_aside_video") for i in outside for k in (0, 1)]
    expected += [(str(bundle["qa_test"]), "[16]", "qa_for_unknown_video"), (str(bundle["qa_test"]), "[17]", "missing_field")]
    assert sorted(qa_q) == sorted(expected)
    assert report.extra["qa_by_split"]["test"] == {"questions": 8, "set_aside": 10}
    assert report.rows_in == report.rows_kept + report.rows_quarantined


def test_category_only_json_with_msrvtt_data_takes_the_captions_from_the_latter(tmp_path, storage):
    cat = write_bundle(tmp_path / "cat", with_sentences=False)
    full = write_bundle(tmp_path / "full")
    report = ingest_msrvtt([str(cat["data"]), str(full["data"])], storage, split_scheme="9k-1kA",
                           train_list=str(full["9k"]), test_list=str(full["test"]))
    rows = read_raw(storage, "msrvtt").to_pylist()
    assert report.extra["videos_by_split"] == {"train": 26, "test": 4} and "note" not in report.extra
    assert all(len(r["captions"]) == 20 and r["source_file"] == str(full["data"]) for r in rows)
    q = quarantine_rows(storage, "msrvtt")
    assert {(r["source_file"], r["reason"]) for r in q} == {(str(cat["data"]), "duplicate_id")} and len(q) == 30
    assert report.rows_in == report.rows_kept + report.rows_quarantined == 60
