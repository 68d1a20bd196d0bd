"""Tokenized manifests: label masks, splits, media-token counts, over-length handling, LLaVA JSON exports."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from mllm_pipeline.download.images import ImageOptions, fetch_images
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.stages.media import media_index
from mllm_pipeline.manifests import (
    ManifestConfig,
    ManifestWriter,
    TemplateConfig,
    TokenizeConfig,
    assign_split,
    load_tokenizer,
    read_manifest_split,
    tokenize_samples,
)
from mllm_pipeline.demo.tokenizer import train_tokenizer
from mllm_pipeline.storage import Storage
from mllm_pipeline.vision.hd import hd_token_count
from mllm_pipeline_tests.download.conftest import make_jpeg, write_raw_shard

CAPTIONS = ["a dog runs on the beach", "two people ride bikes in the city", "a red car parked near a tree",
            "a plate of food on a wooden table", "children play football in a park"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = train_tokenizer(CAPTIONS * 40, tmp_path_factory.mktemp("tok"), vocab_size=400)
    return load_tokenizer(str(path))


def _answer(tok, row) -> str:
    ids = [i for i, m in zip(row["input_ids"], row["label_mask"]) if m]
    return tok.decode(ids)


@pytest.mark.parametrize("style", ["plain", "instruct"])
def test_only_the_answer_is_supervised_and_the_placeholder_is_one_token(tok, style):
    cfg = TokenizeConfig(template=TemplateConfig(style=style))
    t = tokenize_samples(tok, ["s1", "s2"], ["image", "video"], CAPTIONS[:2], np.array([100, 300]), cfg).to_pylist()
    image_id, video_id = tok.convert_tokens_to_ids(["<image>", "<video>"])
    for row, kind_id, caption, media in zip(t, [image_id, video_id], CAPTIONS[:2], [100, 300]):
        assert row["input_ids"].count(kind_id) == 1
        assert _answer(tok, row) == caption + tok.eos_token
        assert row["input_ids"][-1] == tok.eos_token_id and row["input_ids"][0] == tok.bos_token_id
        assert row["text_tokens"] == len(row["input_ids"]) and row["seq_len"] == row["text_tokens"] - 1 + media
    if style == "plain":  # LLaVA pretraining: <image> then the caption, nothing else
        assert tok.decode(t[0]["input_ids"]) == f"{tok.bos_token}<image>{CAPTIONS[0]}{tok.eos_token}"


def test_overlength_is_dropped_or_truncated_never_silently(tok):
    long = " ".join(CAPTIONS * 6)
    drop = tokenize_samples(tok, ["a", "b"], ["image", "image"], [CAPTIONS[0], long], np.array([10, 10]),
                            TokenizeConfig(max_seq_len=120))
    assert drop["overlength"].to_pylist() == [False, True]
    cut = tokenize_samples(tok, ["a", "b", "c"], ["image"] * 3, [CAPTIONS[0], long, CAPTIONS[1]], np.array([10, 10, 500]),
                           TokenizeConfig(max_seq_len=120, overlength="truncate")).to_pylist()
    assert [r["truncated"] for r in cut] == [False, True, False]
    assert cut[1]["seq_len"] == 120 and cut[1]["input_ids"][-1] == tok.eos_token_id
    assert _answer(tok, cut[1]).startswith(CAPTIONS[0][:10])
    assert cut[2]["overlength"]  # the media alone is longer than max_seq_len: cannot be truncated
    with pytest.raises(ValueError, match="overlength"):
        TokenizeConfig(overlength="cut")


def test_splits_are_deterministic_and_keep_official_evaluation_splits():
    cfg = ManifestConfig(val_fraction=0.1, test_fraction=0.05)
    ids = [f"cc3m-{i}" for i in range(20000)]
    first = [assign_split(s, "train", cfg) for s in ids]
    assert first == [assign_split(s, "train", cfg) for s in ids]
    share = {s: first.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(share["val"] - 0.1) < 0.01 and abs(share["test"] - 0.05) < 0.01
    assert assign_split("msrvtt-video7010", "test", cfg) == "test"
    assert assign_split("msrvtt-video6600", "validate", cfg) == "val"
    assert assign_split("coco-139", "val", cfg) == "val"
    with pytest.raises(ValueError, match="val_fraction"):
        ManifestConfig(val_fraction=0.7, test_fraction=0.5)


def test_manifest_join_tokens_and_llava_export(tmp_path, tok):
    sizes = [(640, 480), (300, 900), (512, 512), (2000, 200)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        make_jpeg(tmp_path / f"img/{i}.jpg", w, h, i)
        paths.append(str(tmp_path / f"img/{i}.jpg"))
    paths.append(str(tmp_path / "img/missing.jpg"))
    raw_uri = write_raw_shard(tmp_path / "raw.parquet", [None] * 5, paths, dataset="coco")
    storage = Storage(str(tmp_path / "root"))
    opts = ImageOptions(processes=1, threads=2)
    materialize_shard(storage, dataset="coco", shard_key="shard-00000", shard_index=0, raw_uri=raw_uri,
                      raw_version="v1", options=opts.content_options(), fetch=lambda rows, log: fetch_images(rows, log, opts))
    media = media_index(storage, "coco", "shard-00000")
    assert media.num_rows == 4 and set(media["media_ext"].to_pylist()) == {"jpg"}
    captions = pa.table({"sample_id": ["coco-0", "coco-0", "coco-1", "coco-2", "coco-3", "coco-4"],
                         "caption_index": [0, 1, 0, 0, 0, 0],
                         "caption": CAPTIONS[:4] + [" ".join(CAPTIONS * 10), CAPTIONS[0]]})
    raw = pa.table({"sample_id": [f"coco-{i}" for i in range(5)], "split": ["train", "train", "val", "train", "train"],
                    "media_kind": ["image"] * 5})
    cfg = ManifestConfig(hd_num=4, val_fraction=0.0, tokenize=TokenizeConfig(max_seq_len=1000))
    with storage.new_version("manifests") as version:
        writer = ManifestWriter(storage, version, tok, cfg)
        writer.add("coco", captions, media, raw)
        summary = writer.close()
        version.commit({"summary": summary})
    # coco-4 has no media; coco-3's long caption makes it longer than 1000 tokens: set aside
    assert summary["splits"] == {"train": 3, "val": 1, "test": 0} and summary["dropped_too_long"] == 1
    train = read_manifest_split(storage, "train").to_pylist()
    assert [r["id"] for r in train] == ["coco-0#0", "coco-0#1", "coco-1#0"]
    for r in train:
        w, h = sizes[int(r["sample_id"].split("-")[1])]
        assert (r["width"], r["height"]) == (w, h)
        assert r["media_tokens"] == hd_token_count(w, h, 4)
        assert r["seq_len"] == r["text_tokens"] - 1 + r["media_tokens"]
        assert _answer(tok, r) == r["caption"] + tok.eos_token
    root = tmp_path / "root" / "manifests" / storage.read_manifest("manifests")["version"]
    conv = json.loads(train[0]["conversations"])  # the LLaVA conversation the exports write out
    assert conv[0]["value"].startswith("<image>\n") and conv[1] == {"from": "gpt", "value": CAPTIONS[0]}
    assert not (root / "llava").exists()  # the trainers' files are the exports' (export_llava), not the manifests'
    rejected = __import__("pyarrow.parquet").parquet.read_table(root / "rejected.parquet").to_pylist()
    assert [(r["id"], r["reason"]) for r in rejected] == [("coco-3#0", "too_long")]


def test_tokenizer_identity_reads_the_tokenizer_files_not_the_weights(tmp_path):
    """A model's release directory as the tokenizer: its weights are not read (the 4KHD release holds 16 GB of them);
    a changed tokenizer file changes the identity, a changed weight file does not."""
    from mllm_pipeline.stages.manifests import tokenizer_identity

    for name, data in (("tokenizer.model", b"sp"), ("tokenizer_config.json", b"{}"), ("tokenization_internlm2.py", b"#"),
                       ("special_tokens_map.json", b"{}"), ("pytorch_model-00001-of-00002.bin", b"w" * 1000),
                       ("config.json", b"{}"), ("model.safetensors", b"w")):
        (tmp_path / name).write_bytes(data)
    ident = tokenizer_identity(str(tmp_path))
    assert set(ident) == {"tokenizer.model", "tokenizer_config.json", "tokenization_internlm2.py", "special_tokens_map.json"}
    (tmp_path / "model.safetensors").write_bytes(b"changed")
    assert tokenizer_identity(str(tmp_path)) == ident
    (tmp_path / "tokenizer.model").write_bytes(b"sp2")
    assert tokenizer_identity(str(tmp_path)) != ident
