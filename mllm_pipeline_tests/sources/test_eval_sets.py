"""Declared evaluation sets on COCO at the real image counts: Karpathy's split against the 2017 and 2014 caption files.

The layouts, field for field, from their publishers: Karpathy's ``dataset_coco.json`` (NeuralTalk2's
``prepro.py`` reads ``images[*].filepath``, ``filename``, ``cocoid``, ``split``, ``sentences[*].raw`` /
``tokens``, ``imgid``, ``sentids``: 113,287 train + restval, 5,000 val, 5,000 test, all from COCO 2014), BLIP's /
LAVIS's ``coco_karpathy_test.json`` (``[{"image": "val2014/COCO_val2014_<12 digits>.jpg", "caption": [...]}]``), and
the COCO caption files (``images[*].id``, ``file_name``, ``coco_url``; ``annotations[*].image_id``, ``caption``).
The id layout is COCO's: train2017 = train2014 + val2014 minus val2017 (5,000 images of val2014); image ids are
the same in both years. Image counts are real (82,783 train2014, 40,504 val2014); each image has one caption here
instead of about five, which the rules do not depend on.
"""

from __future__ import annotations

import json
import logging
import random

import pyarrow.compute as pc
import pytest

from mllm_pipeline.sources.coco import ingest_coco
from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.stages.verify import verify_raw
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.helpers import read_raw

log = logging.getLogger(__name__)
N_TRAIN2014, N_VAL2014 = 82_783, 40_504


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco")
    rng = random.Random(7)
    train2014 = list(range(1, N_TRAIN2014 + 1))
    val2014 = list(range(200_001, 200_001 + N_VAL2014))
    shuffled = rng.sample(val2014, len(val2014))
    k_test, k_val, val2017 = set(shuffled[:5000]), set(shuffled[5000:10000]), set(rng.sample(val2014, 5000))

    def captions(name: str, ids: list[int], folder: str) -> None:
        images = [{"id": i, "file_name": f"{i:012d}.jpg" if "2017" in folder else f"COCO_{folder}_{i:012d}.jpg",
                   "coco_url": f"http://images.cocodataset.org/{folder}/{i:012d}.jpg", "width": 640, "height": 480}
                  for i in ids]
        anns = [{"id": 10 * i, "image_id": i, "caption": f"a picture number {i} of a street"} for i in ids]
        (d / f"annotations/{name}").parent.mkdir(parents=True, exist_ok=True)
        (d / f"annotations/{name}").write_text(json.dumps({"images": images, "annotations": anns}))

    captions("captions_train2017.json", train2014 + [i for i in val2014 if i not in val2017], "train2017")
    captions("captions_val2017.json", sorted(val2017), "val2017")
    captions("captions_train2014.json", train2014, "train2014")
    captions("captions_val2014.json", val2014, "val2014")

    def split(i: int) -> str:
        return "test" if i in k_test else "val" if i in k_val else "restval" if i >= 200_001 else "train"

    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014" if i >= 200_001 else "train2014", "sentids": [n], "imgid": n, "split": split(i),
         "filename": f"COCO_{'val' if i >= 200_001 else 'train'}2014_{i:012d}.jpg", "cocoid": i,
         "sentences": [{"tokens": ["a", "picture"], "raw": "A picture.", "imgid": n, "sentid": n}]}
        for n, i in enumerate(train2014 + val2014)]}
    (d / "dataset_coco.json").write_text(json.dumps(karpathy))
    (d / "coco_karpathy_test.json").write_text(json.dumps(
        [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": ["A picture."] * 5} for i in sorted(k_test)]))
    return {"dir": d, "test": k_test, "val": k_val, "val2017": val2017}


def _ingest(tmp_path, coco, names, eval_sets):
    st = Storage(str(tmp_path / "root"))
    rep = ingest_coco([str(coco["dir"] / "annotations" / n) for n in names], st, logger=log,
                      eval_sets=[str(coco["dir"] / e) for e in eval_sets])
    v = verify_raw(st, "coco")
    assert not v.problems, v.problems
    return st, rep


def _by_split(st):
    raw = read_raw(st, "coco")
    split = raw["split"].cast("string")
    return {s: set(int(x.removeprefix("coco-")) for x in raw.filter(pc.equal(split, s))["sample_id"].to_pylist())
            for s in set(split.to_pylist())}, raw


def test_karpathy_split_on_the_2017_files(tmp_path, coco):
    st, rep = _ingest(tmp_path, coco, ["captions_train2017.json", "captions_val2017.json"], ["dataset_coco.json"])
    sets = {s["name"]: s for s in rep.extra["eval_sets"]}
    assert {n: (s["split"], s["entries"], s["found"], s["not_found"]) for n, s in sets.items()} == {
        "karpathy_test": ("test", 5000, 5000, 0), "karpathy_val": ("val", 5000, 5000, 0)}
    by, raw = _by_split(st)
    assert by["test"] == coco["test"]
    # val2017 images stay evaluation images; Karpathy's val joins them
    assert by["val"] == coco["val"] | (coco["val2017"] - coco["test"])
    assert len(by["train"]) == N_TRAIN2014 + N_VAL2014 - len(by["test"]) - len(by["val"])
    assert rep.rows_kept == N_TRAIN2014 + N_VAL2014 and not rep.quarantined
    sets_col = dict(zip(*[raw[c].to_pylist() for c in ("sample_id", "eval_set")]))
    assert sum(1 for v in sets_col.values() if v == "karpathy_test") == 5000


def test_the_per_split_list_on_the_2014_files(tmp_path, coco):
    st, rep = _ingest(tmp_path, coco, ["captions_train2014.json", "captions_val2014.json"], ["coco_karpathy_test.json"])
    assert [(s["name"], s["found"]) for s in rep.extra["eval_sets"]] == [("coco_karpathy_test", 5000)]
    by, _ = _by_split(st)
    assert by["test"] == coco["test"] and len(by["val"]) == N_VAL2014 - 5000


def test_2014_and_2017_files_together_give_each_image_one_split(tmp_path, coco):
    names = ["captions_train2017.json", "captions_val2017.json", "captions_train2014.json", "captions_val2014.json"]
    st, rep = _ingest(tmp_path, coco, names, [])
    assert rep.rows_kept == N_TRAIN2014 + N_VAL2014
    assert rep.quarantined == {"duplicate_id": N_TRAIN2014 + N_VAL2014}
    by, _ = _by_split(st)
    assert coco["val2017"] <= by["val"]  # the evaluation files were read first: val keeps a shared image


def test_a_set_that_names_no_image_of_the_dataset_stops_the_ingest(tmp_path, coco):
    other = tmp_path / "msrvtt_ret_test1k.json"
    other.write_text(json.dumps([{"video": "video7020.mp4", "caption": "a man sings"}]))
    st = Storage(str(tmp_path / "root"))
    with pytest.raises(SourceFormatError, match="none of its 1 media") as e:
        ingest_coco([str(coco["dir"] / "annotations/captions_val2017.json")], st, eval_sets=[str(other)])
    assert "msrvtt_ret_test1k.json" in str(e.value) and "Nothing was committed" in str(e.value)
    assert st.current("raw/coco") is None
