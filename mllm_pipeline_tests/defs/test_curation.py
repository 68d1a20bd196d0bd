"""Curation on files in the official layouts, through the real assets: hypernymised CC3M captions shared by many
images are kept, media copies collapse to one sample with the union of their captions, a CC3M image that copies a
COCO val image is not trained on, and COCO val reaches the manifests whole."""

from __future__ import annotations

import io
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from mllm_pipeline.defs.checks import evaluation_splits_whole, nothing_silently_lost
from mllm_pipeline.defs.curate.captions import CAPTION_ASSETS, captions_dedup
from mllm_pipeline.defs.curate.media_hashes import media_hashes
from mllm_pipeline.defs.ingest.assets import raw_cc3m, raw_coco
from mllm_pipeline.defs.manifests import manifests
from mllm_pipeline.defs.media.assets import images_cc3m, images_coco
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.manifests import read_manifest_split
from mllm_pipeline.storage import Storage
from mllm_pipeline.stages.dedup import dedup_drops, dedup_merges
from mllm_pipeline_tests.media_server import serve_directory
from mllm_pipeline_tests.metadata import blobs, table_column

SHARED = "actor attends the premiere of the film"


def picture(seed: int, size: tuple[int, int] = (160, 120), quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth random structure (distinct seeds give perceptual hashes ~30 bits apart)."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, caption_tokenizer):
    tmp = tmp_path_factory.mktemp("curation")
    www, coco = tmp / "www", tmp / "coco"
    # COCO: 3 val and 3 train images, five captions each (one val caption is short, one train image repeats one)
    val_caps = [[f"a {c} dog sitting on a {o} sofa in the room" for c, o in (("brown", "red"), ("small", "green"), ("big", "blue"), ("white", "grey"), ("black", "tan"))],
                ["two giraffes standing next to a tree in the open savanna", "giraffes near a tree", "a pair of giraffes by a tree on the plain",
                 "tall animals grazing from a tree", "A cat."],
                ["a man riding a wave on top of a surfboard", "a surfer rides a big wave", "a person surfing in the ocean",
                 "someone on a surfboard in the sea", "a man surfing a large wave"]]
    train_caps = [[f"a plate of {f} on a wooden table" for f in ("food", "pasta", "rice", "salad", "salad")],
                  [f"a red bus parked on a {s} street" for s in ("city", "busy", "quiet", "wide", "narrow")],
                  [f"children playing football in the {p}" for p in ("park", "yard", "field", "garden", "street")]]
    for split, caps, base in (("val", val_caps, 100), ("train", train_caps, 200)):
        images = [{"id": base + i, "file_name": f"{base + i:012d}.jpg", "height": 120, "width": 160,
                   "coco_url": f"http://images.cocodataset.org/{split}2017/{base + i:012d}.jpg"} for i in range(3)]
        anns = [{"image_id": base + i, "id": 1000 * (base + i) + k, "caption": c} for i, cs in enumerate(caps) for k, c in enumerate(cs)]
        for i in range(3):
            _write(coco / f"{split}2017/{base + i:012d}.jpg", picture(base + i))
        _write(coco / f"annotations/captions_{split}2017.json", json.dumps({"images": images, "annotations": anns}).encode())
    # CC3M: 12 distinct images sharing one hypernymised caption; one image under two URLs (same bytes); a
    # re-encoded, resized copy; a copy of COCO val image 100; a distinct image captioned like a COCO val caption
    rows = []
    for i in range(12):
        _write(www / f"shared/{i}.jpg", picture(1000 + i))
        rows.append((SHARED, f"shared/{i}.jpg"))
    _write(www / "a/1.jpg", picture(2000))
    _write(www / "mirror/a.jpg", picture(2000))
    rows += [("a lighthouse on a rocky coast at dusk", "a/1.jpg"), ("lighthouse standing on the rocks by the sea", "mirror/a.jpg")]
    _write(www / "b.jpg", picture(3000))
    _write(www / "b_small.jpg", picture(3000, (120, 90), quality=60))
    rows += [("a vintage car in front of a barn", "b.jpg"), ("old car parked by a wooden barn", "b_small.jpg")]
    _write(www / "leak.jpg", (coco / "val2017/000000000100.jpg").read_bytes())
    rows.append(("a dog on a couch", "leak.jpg"))
    _write(www / "other.jpg", picture(4000))
    rows.append(("two giraffes standing next to a tree in the open savanna", "other.jpg"))
    # a declared evaluation set: COCO's Karpathy test list (BLIP / LAVIS coco_karpathy_test.json: val2014 file
    # names, five captions) names train2017 image 201; a CC3M row carries a copy of that image
    karpathy = coco / "annotations/coco_karpathy_test.json"
    karpathy.write_text(json.dumps([{"image": "val2014/COCO_val2014_000000000201.jpg", "caption": train_caps[1]}]))
    _write(www / "leak201.jpg", (coco / "train2017/000000000201.jpg").read_bytes())
    rows.append(("a bus waiting at the curb", "leak201.jpg"))
    root = tmp / "root"
    resources = {"storage": StorageResource(root=str(root)), "tracking": TrackingResource()}
    # the instance lives under this module's own temporary folder (its run database with it)
    (tmp / "dagster_home").mkdir()
    with serve_directory(www) as server, dg.instance_for_test(temp_dir=str(tmp / "dagster_home")) as instance:
        tsv = tmp / "cc3m/Train_GCC-training.tsv"
        tsv.parent.mkdir(parents=True)
        tsv.write_text("".join(f"{c}\t{server.base_url}/{p}\n" for c, p in rows))

        def run(assets, config=None, partition=None):
            result = dg.materialize(assets, instance=instance, resources=resources, partition_key=partition,
                                    run_config={"ops": config or {}}, raise_on_error=True)
            assert result.success
            for event in result.get_asset_materialization_events():  # tables, not JSON blobs, in the UI
                materialization = event.step_materialization_data.materialization
                assert not blobs(materialization.metadata), (materialization.asset_key, blobs(materialization.metadata))
            return result

        run([raw_cc3m], {"raw_cc3m": {"config": {"paths": [str(tsv)]}}})
        run([raw_coco], {"raw_coco": {"config": {"paths": [str(coco / "annotations/captions_train2017.json"),
                                                            str(coco / "annotations/captions_val2017.json")],
                                                  "images_dir": str(coco), "eval_sets": [str(karpathy)]}}})
        media_cfg = {"processes": 1, "threads": 4, "retries": 0, "allow_loopback": True}
        run([images_cc3m], {"images_cc3m": {"config": media_cfg}}, "shard-00000")
        run([images_coco], {"images_coco": {"config": media_cfg}}, "shard-00000")
        caps = {a.key.path[-1]: a for a in CAPTION_ASSETS}
        run([caps["captions_cc3m"]], partition="shard-00000")
        run([caps["captions_coco"]], partition="shard-00000")
        run([media_hashes], {"media_hashes": {"config": {"workers": 1}}})
        first = run([captions_dedup])
        again = run([captions_dedup])
        built = run([manifests, nothing_silently_lost, evaluation_splits_whole],
                    {"manifests": {"config": {"val_fraction": 0.0,
                                               "tokenizer": caption_tokenizer}}})
    return {"storage": Storage(str(root)), "dedup": first, "again": again, "manifests": built}


def _md(result, key):
    return result.asset_materializations_for_node(result.all_node_events[0].node_name)[0].metadata[key].value


def test_distinct_images_keep_a_caption_they_share(curated):
    st = curated["storage"]
    train = read_manifest_split(st, "train")
    shared = train.filter(pc.equal(train["caption"], SHARED))
    assert shared.num_rows == 12 and len(set(shared["sample_id"].to_pylist())) == 12


def test_media_copies_collapse_to_one_sample_with_the_union_of_captions(curated):
    st = curated["storage"]
    media = {(r["sample_id"], r["reason"], r["match"]) for r in
             st.read_parquet(f"captions/_dedup/{st.read_manifest('captions/_dedup')['version']}/media.parquet").to_pylist()}
    # cc3m rows are numbered from 1: the two lighthouse URLs are rows 13 and 14, the two cars rows 15 and 16
    assert ("cc3m-train-000000014", "media_duplicate", "exact") in media
    assert ("cc3m-train-000000016", "media_duplicate", "near") in media
    merges = dedup_merges(st, "cc3m").to_pylist()
    moved = {(m["sample_id"], m["from_sample_id"], m["caption"]) for m in merges}
    assert ("cc3m-train-000000013", "cc3m-train-000000014", "lighthouse standing on the rocks by the sea") in moved
    assert ("cc3m-train-000000015", "cc3m-train-000000016", "old car parked by a wooden barn") in moved
    train = read_manifest_split(st, "train")
    by_sample: dict[str, list[str]] = {}
    for sid, cap in zip(train["sample_id"].to_pylist(), train["caption"].to_pylist()):
        by_sample.setdefault(sid, []).append(cap)
    assert sorted(by_sample["cc3m-train-000000013"]) == ["a lighthouse on a rocky coast at dusk",
                                                         "lighthouse standing on the rocks by the sea"]
    assert "cc3m-train-000000014" not in by_sample and "cc3m-train-000000016" not in by_sample
    assert len(set(train["id"].to_pylist())) == train.num_rows  # a moved caption never takes an own caption's id


def test_copies_of_evaluation_media_and_captions_are_not_trained_on(curated):
    st = curated["storage"]
    drops = {r["sample_id"]: r for r in dedup_drops(st, "cc3m").to_pylist()}
    leak = drops["cc3m-train-000000017"]
    # the stored bytes may differ (the media stages encode differently), the picture does not
    assert leak["reason"] == "eval_leak" and leak["detail"].endswith("of evaluation sample coco:coco-100")
    assert drops["cc3m-train-000000018"]["reason"] == "eval_leak"
    assert "coco_val" in drops["cc3m-train-000000018"]["detail"] or "coco:val" in drops["cc3m-train-000000018"]["detail"]
    train = read_manifest_split(st, "train")
    assert not {"cc3m-train-000000017", "cc3m-train-000000018"} & set(train["sample_id"].to_pylist())


def test_the_evaluation_split_arrives_whole(curated):
    st = curated["storage"]
    val = read_manifest_split(st, "val")
    coco_val = val.filter(pc.equal(val["dataset"], "coco"))
    assert coco_val.num_rows == 15 and len(set(coco_val["sample_id"].to_pylist())) == 3
    assert "A cat." in coco_val["caption"].to_pylist()  # too short for training, kept as the benchmark has it
    summary = st.read_manifest("manifests")["summary"]
    coco = [e for e in summary["eval_splits"] if e["dataset"] == "coco"]
    assert coco == [{"dataset": "coco", "split": "test", "samples_in": 1, "samples_out": 1, "captions_in": 5,
                     "captions_out": 5, "without_media": 0, "whole": True},
                    {"dataset": "coco", "split": "val", "samples_in": 3, "samples_out": 3, "captions_in": 15,
                     "captions_out": 15, "without_media": 0, "whole": True}]
    checks = {c.check_name: c.passed for c in curated["manifests"].get_asset_check_evaluations()}
    assert checks == {"evaluation_splits_whole": True, "nothing_silently_lost": True}
    # within one COCO training image, the repeated caption is dropped
    train = read_manifest_split(st, "train")
    assert train.filter(pc.equal(train["sample_id"], "coco-200")).num_rows == 4


def test_a_declared_evaluation_set_is_evaluated_on_and_its_copies_are_not_trained_on(curated):
    """The Karpathy test list names a train2017 image by its val2014 file name: the image becomes an evaluation
    sample of that set (split test, kept whole), and a CC3M copy of it is an evaluation leak."""
    st = curated["storage"]
    raw_md = st.read_manifest("raw/coco")["extra"]["eval_sets"]
    assert raw_md == [{"name": "coco_karpathy_test", "split": "test", "file": raw_md[0]["file"], "entries": 1,
                       "distinct_media": 1, "found": 1, "not_found": 0}]
    summary = st.read_manifest("manifests")["summary"]
    assert summary["eval_sets"] == [{"dataset": "coco", "eval_set": "coco_karpathy_test", "samples_in": 1,
                                     "without_media": 0, "samples_out": 1, "whole": True}]
    test = read_manifest_split(st, "test")
    assert set(test.filter(pc.equal(test["dataset"], "coco"))["sample_id"].to_pylist()) == {"coco-201"}
    train = read_manifest_split(st, "train")
    assert not {"coco-201", "cc3m-train-000000019"} & set(train["sample_id"].to_pylist())
    leak = {r["sample_id"]: r for r in dedup_drops(st, "cc3m").to_pylist()}["cc3m-train-000000019"]
    assert leak["reason"] == "eval_leak" and "coco-201" in leak["detail"]
    md = curated["manifests"].asset_materializations_for_node("manifests")[0].metadata
    assert "coco_karpathy_test" in table_column(md["evaluation_sets"], "eval_set")


def test_dedup_is_named_by_its_inputs(curated):
    first = curated["dedup"].asset_materializations_for_node("captions_dedup")[0].metadata
    again = curated["again"].asset_materializations_for_node("captions_dedup")[0].metadata
    assert again["up_to_date"].value is True and first["version"].value == again["version"].value
