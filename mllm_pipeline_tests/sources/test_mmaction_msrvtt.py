"""MSR-VTT as MMAction2's preparation guide lays it out (the VindLU annotation folder), at the real counts.

The fixture (:mod:`mllm_pipeline_tests.sources.mmaction_msrvtt`) is built field for field from MMAction2's readers in
``mmaction/datasets/msrvtt_datasets.py`` (``MSRVTTRetrieval``, ``MSRVTTVQA``, ``MSRVTTVQAMC``) and the released
counts: 9,000 / 7,010 training videos, the 1,000 1k-A test videos, the 2,990 multiple-choice test videos, and the
MSRVTT-QA questions (158,581 / 12,278 / 72,821)."""

from __future__ import annotations

import json
import logging

import pyarrow.compute as pc
import pytest

from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.sources.msrvtt import check_scheme, ingest_msrvtt
from mllm_pipeline.stages.verify import verify_raw
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.helpers import quarantine_rows, read_raw
from mllm_pipeline_tests.sources.mmaction_msrvtt import CAPTIONS_EACH, QA_COUNTS, layout, write_folder

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    dest = tmp_path_factory.mktemp("msrvtt")
    files = write_folder(dest)
    return dest, files, sorted(str(p) for p in files.values())


def _ingest(tmp_path, paths, **kw):
    st = Storage(str(tmp_path / "root"))
    return st, ingest_msrvtt(paths, st, logger=log, **kw)


def _verified(st):
    v = verify_raw(st, "msrvtt")
    assert not v.problems, v.problems
    return v


def test_the_whole_folder_under_9k_1kA(tmp_path, folder):
    _, files, paths = folder
    st, rep = _ingest(tmp_path, paths, split_scheme="9k-1kA")
    x = rep.extra
    assert rep.rows_in == rep.rows_kept == 10_000 and rep.quarantined == {}
    assert x["videos_by_split"] == {"train": 9000, "test": 1000}
    assert x["captions"] == 9000 * CAPTIONS_EACH + 1000
    assert x["videos_by_eval_set"] == {"msrvtt_ret_test1k": 1000}
    # the multiple-choice test is the official test split: 1,990 of its videos are 9k training videos by design
    assert x["mc_test"] == {"file": str(files["mc_test"]), "entries": 2990, "set_aside": 0, "overlap_policy": "training",
                            "entries_kept": 2990, "videos_only_here": 0, "videos_overlapping_training": 1990}
    assert {q: x["qa_by_split"][q]["questions"] for q in x["qa_by_split"]} == QA_COUNTS
    assert sorted(s["file"] for s in x["skipped_files"]) == [str(files["qa_answer_list"]), str(files["ret_train7k"])]
    v = _verified(st)
    assert v.counts["qa_entries"] == sum(QA_COUNTS.values()) and v.counts["mc_entries"] == 2990
    raw = read_raw(st, "msrvtt")
    test = raw.filter(pc.equal(raw["split"].cast("string"), "test"))
    assert sorted(int(s.removeprefix("msrvtt-video")) for s in test["sample_id"].to_pylist()) == layout()["1k"]
    # the 1k-A sentence is the evaluation caption; every test video is kept whole with its multiple-choice entry
    assert all(c == [e] for c, e in zip(test["captions"].to_pylist(), test["eval_caption"].to_pylist()))
    assert test["src_mc_options"].null_count == 0
    # a question with a list of answers keeps them all and trains on the most frequent
    qa = [q for qs in raw["qa"].to_pylist() if qs for q in qs if q["answers"]]
    assert qa and all(q["answer"] == max(set(q["answers"]), key=q["answers"].count) for q in qa)


def test_7k_1kA_makes_the_other_multiple_choice_videos_evaluation_rows(tmp_path, folder):
    _, _, paths = folder
    st, rep = _ingest(tmp_path, paths, split_scheme="7k-1kA")
    x = rep.extra
    assert x["videos_by_split"] == {"train": 7010, "test": 2990}
    assert x["videos_by_eval_set"] == {"msrvtt_ret_test1k": 1000, "msrvtt_mc_test": 1990}
    assert x["mc_test"]["videos_only_here"] == 1990 and x["mc_test"]["videos_overlapping_training"] == 0
    assert x["captions"] == 7010 * CAPTIONS_EACH + 1000
    _verified(st)


def test_the_overlap_can_give_way_to_evaluation(tmp_path, folder):
    _, _, paths = folder
    st, rep = _ingest(tmp_path, paths, split_scheme="9k-1kA", mc_overlap="evaluation")
    assert rep.extra["videos_by_split"] == {"train": 7010, "test": 2990}
    assert rep.extra["videos_by_eval_set"] == {"msrvtt_ret_test1k": 1000, "msrvtt_mc_test": 1990}
    _verified(st)


def test_both_training_files_under_official_is_a_question_not_a_guess(folder):
    _, _, paths = folder
    with pytest.raises(ValueError, match="set split_scheme to 9k-1kA or 7k-1kA"):
        check_scheme("official", None, None, paths)
    one = [p for p in paths if "train7k" not in p]
    check_scheme("official", None, None, one)  # one training file: its name gives the split
    check_scheme("9k-1kA", None, None, one)  # the folder needs no CSV split lists
    with pytest.raises(ValueError, match="needs its training caption file"):
        check_scheme("7k-1kA", None, None, one)


def test_faults_are_set_aside_by_entry_and_reason(tmp_path):
    """Small files in the same layouts, each with a fault real dumps have."""
    d = tmp_path / "ann"
    d.mkdir()
    train = [{"video": f"video{i}.mp4", "caption": f"a man cooks dish {i} number {k}", "duration": 10.0}
             for i in range(6) for k in range(3)]
    train.append({"video": "video9.mp4"})  # no caption
    test = [{"video": "video7.mp4", "caption": ["a dog runs on the beach", "a dog plays in the sand"]},  # a list
            {"video": "video8.mp4", "caption": "a woman sings on a stage"},
            {"video": "video5.mp4", "caption": "a man cooks dish 5 number 0"}]  # also a training video: test wins
    mc = [{"video": "video7.mp4", "caption": ["a", "b", "c", "d", "e"], "answer": 1},
          {"video": "video7.mp4", "caption": ["a", "b", "c", "d", "e"], "answer": 2},  # the same video twice
          {"video": "video8.mp4", "caption": ["a", "b"], "answer": 5},  # not an option
          {"video": "video6.mp4", "caption": ["x", "y", "z", "w", "v"], "answer": 0}]  # a video only here
    qa = [{"video": "video1.mp4", "question": "what is cooked?", "answer": ["dish", "dish", "food"], "question_id": 1},
          {"video": "video2.mp4", "question": "who cooks?", "answer": [], "question_id": 2},  # no answer
          {"video": "video99.mp4", "question": "what?", "answer": "x", "question_id": 3}]  # unknown video
    names = {"msrvtt_ret_train9k.json": train, "msrvtt_ret_test1k.json": test, "msrvtt_mc_test.json": mc,
             "msrvtt_qa_test.json": qa, "msrvtt_qa_answer_list.json": ["dish", "food"]}
    for name, doc in names.items():
        (d / name).write_text(json.dumps(doc))
    st, rep = _ingest(tmp_path, sorted(str(d / n) for n in names))
    reasons = {(r["source_file"].rsplit("/", 1)[-1], r["locator"], r["reason"]) for r in quarantine_rows(st, "msrvtt")}
    assert reasons == {("msrvtt_ret_train9k.json", "[18]", "missing_field"),
                       ("msrvtt_ret_train9k.json", "[15]", "in_test_file"),
                       ("msrvtt_mc_test.json", "[1]", "duplicate_id"),
                       ("msrvtt_mc_test.json", "[2]", "bad_answer"),
                       ("msrvtt_qa_test.json", "[1]", "missing_field"),
                       ("msrvtt_qa_test.json", "[2]", "qa_for_unknown_video")}
    assert rep.rows_in == rep.rows_kept + sum(rep.quarantined.values())
    raw = {r["sample_id"]: r for r in read_raw(st, "msrvtt").to_pylist()}
    assert raw["msrvtt-video7"]["captions"] == ["a dog runs on the beach", "a dog plays in the sand"]
    assert raw["msrvtt-video7"]["eval_caption"] is None and raw["msrvtt-video7"]["src_mc_answer"] == 1
    assert raw["msrvtt-video5"]["split"] == "test" and raw["msrvtt-video5"]["eval_caption"] == "a man cooks dish 5 number 0"
    assert raw["msrvtt-video6"]["eval_set"] == "msrvtt_mc_test" and raw["msrvtt-video6"]["captions"] == []
    assert raw["msrvtt-video1"]["qa"][0]["answers"] == ["dish", "dish", "food"]
    _verified(st)


def test_an_unknown_json_shape_names_the_file(tmp_path):
    p = tmp_path / "msrvtt_ret_train9k.json"
    p.write_text(json.dumps({"annotations": []}))
    with pytest.raises(SourceFormatError, match="msrvtt_ret_train9k.json"):
        _ingest(tmp_path, [str(p)])
