"""MSRVTT-QA pairs on the raw rows become instruction samples in the manifests: one per question or one per video
as turns, answers supervised, the QA test split whole whatever the video's retrieval split."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from mllm_pipeline.manifests import ManifestConfig, ManifestWriter, TokenizeConfig, load_tokenizer, read_manifest_split
from mllm_pipeline.stages.manifests import read_raw_for_manifests
from mllm_pipeline.demo.tokenizer import train_tokenizer
from mllm_pipeline.sources.common import read_raw_shards
from mllm_pipeline.sources.msrvtt import ingest_msrvtt
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.sources.msrvtt_bundle import JSFUSION, N_TEST, write_bundle


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"video {i} caption {k} a person is doing something what is the person in video {i} doing {k}? man cook"
             for i in range(30) for k in range(3)]
    return load_tokenizer(str(train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The 9k-1kA bundle with MSRVTT-QA ingested: (storage, raw shard table with qa)."""
    tmp = tmp_path_factory.mktemp("qa")
    b = write_bundle(tmp / "msrvtt")
    storage = Storage(str(tmp / "root"))
    ingest_msrvtt([str(b["data"])], storage, split_scheme="9k-1kA", train_list=str(b["9k"]), test_list=str(b["test"]),
                  qa_paths=[str(b[f"qa_{s}"]) for s in ("train", "val", "test")], rows_per_shard=100)
    (uri,) = read_raw_shards(storage, "msrvtt")
    return read_raw_for_manifests(uri)


def _build(tmp_path, tok, raw, qa_samples, drop_media=()):
    storage = Storage(str(tmp_path / f"m-{qa_samples}"))
    sids = [s for s in raw["sample_id"].to_pylist() if s not in drop_media]
    media = pa.table({"sample_id": sids, "media_tar": ["media/msrvtt/shard-00000.tar"] * len(sids),
                      "media_key": [s.split("-")[1] for s in sids], "media_ext": ["mp4"] * len(sids),
                      "width": pa.array([320] * len(sids), pa.int32()), "height": pa.array([240] * len(sids), pa.int32())})
    captions = pa.table({"sample_id": raw["sample_id"], "caption_index": [0] * raw.num_rows,
                         "caption": [f"video {s.split('video')[1]} caption 0 a person is doing something" for s in raw["sample_id"].to_pylist()]})
    r = raw.set_column(1, "split", raw["split"].cast(pa.string())).set_column(2, "media_kind", raw["media_kind"].cast(pa.string()))
    cfg = ManifestConfig(hd_num=1, video_frames=2, val_fraction=0.0, qa_samples=qa_samples,
                         tokenize=TokenizeConfig(max_seq_len=2048, chat_format="simple"))
    with storage.new_version("manifests") as version:
        writer = ManifestWriter(storage, version, tok, cfg)
        writer.add("msrvtt", captions, media, r)
        summary = writer.close()
        version.commit({"summary": summary})
    return storage, summary


def _answers(tok, row) -> list[str]:
    out, cur = [], []
    for i, m in zip(row["input_ids"], row["label_mask"]):
        if m:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


def test_one_instruction_sample_per_question_and_the_test_split_whole(tmp_path, tok, raw):
    storage, summary = _build(tmp_path, tok, raw, "per_question")
    by = summary["by_dataset"]
    # 60 questions: train 40 (on train videos), val 4, test 16 (4 JSFusion videos + 4 official-test videos the 9k
    # scheme trains on: their questions are still test questions)
    assert (by["msrvtt.qa.train"], by["msrvtt.qa.val"], by["msrvtt.qa.test"]) == (40, 4, 16)
    assert by["msrvtt.qa_pairs"] == 60
    test = read_manifest_split(storage, "test").to_pylist()
    qa_test = [r for r in test if r["task"] == "qa"]
    assert len(qa_test) == 2 * N_TEST and {r["sample_id"] for r in qa_test} == {f"msrvtt-video{i}" for i in range(22, 30)}
    assert [r for r in test if r["task"] == "caption"] and all(
        r["sample_id"] in {f"msrvtt-video{i}" for i in JSFUSION} for r in test if r["task"] == "caption")
    r = min((x for x in qa_test if x["sample_id"] == "msrvtt-video23"), key=lambda x: int(x["id"].rsplit("-", 1)[1]))
    assert r["id"].startswith("msrvtt-video23#qa-test-")
    conv = json.loads(r["conversations"])
    assert conv[0] == {"from": "human", "value": "<video>\nwhat is the person in video 23 doing 0?"}
    assert conv[1] == {"from": "gpt", "value": "man"} and r["caption"] == "man"
    assert _answers(tok, r) == ["man" + tok.eos_token]
    assert r["seq_len"] == r["text_tokens"] - 1 + r["media_tokens"]
    train = read_manifest_split(storage, "train").to_pylist()
    assert all(x["split"] == "train" for x in train) and sum(x["task"] == "qa" for x in train) == 40
    root = storage.uri(f"manifests/{storage.read_manifest('manifests')['version']}")
    assert not Path(root, "llava").exists()  # the trainers' files are the exports' (export_llava), not the manifests'


def test_all_of_a_videos_questions_as_turns(tmp_path, tok, raw):
    storage, summary = _build(tmp_path, tok, raw, "turns", drop_media=("msrvtt-video0",))
    by = summary["by_dataset"]
    assert (by["msrvtt.qa.train"], by["msrvtt.qa.val"], by["msrvtt.qa.test"]) == (19, 2, 8)  # samples: one a video
    assert by["msrvtt.qa_without_media"] == 2  # video0's two questions: no media, counted
    r = next(x for x in read_manifest_split(storage, "test").to_pylist() if x["id"] == "msrvtt-video22#qa-test")
    conv = json.loads(r["conversations"])
    assert [t["from"] for t in conv] == ["human", "gpt", "human", "gpt"]
    assert conv[0]["value"].startswith("<video>\n") and "<video>" not in conv[2]["value"]
    assert _answers(tok, r) == ["man" + tok.eos_token, "cook" + tok.eos_token] and r["caption"] == "man\ncook"
    assert r["input_ids"].count(tok.convert_tokens_to_ids("<video>")) == 1


def test_no_qa_samples_when_switched_off(tmp_path, tok, raw):
    storage, summary = _build(tmp_path, tok, raw, "none")
    assert not any(k.startswith("msrvtt.qa") for k in summary["by_dataset"])
    with pytest.raises(ValueError, match="qa_samples"):
        ManifestConfig(qa_samples="all")
