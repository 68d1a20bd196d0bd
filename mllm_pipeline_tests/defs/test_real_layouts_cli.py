"""The layouts users actually have, through the real CLI with a YAML config as the README shows it: MSR-VTT's
MMAction2 / VindLU annotation folder at the released counts (fixture: :mod:`mllm_pipeline_tests.sources.mmaction_msrvtt`,
from MMAction2's ``mmaction/datasets/msrvtt_datasets.py``) and COCO with a declared Karpathy test list (BLIP / LAVIS
``coco_karpathy_test.json``: ``[{"image": "val2014/COCO_val2014_<12 digits>.jpg", "caption": [...]}]``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mllm_pipeline.stages.verify import verify_raw
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.sources.mmaction_msrvtt import QA_COUNTS, write_folder

REPO = Path(__file__).resolve().parents[2]


def _materialize(tmp_path, select: str, config: dict) -> str:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    cfg = tmp_path / f"{select}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "MLLM_STORAGE_ROOT": str(tmp_path / "root"), "DAGSTER_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "mllm_pipeline.definitions",
                           "--select", select, "-c", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "RUN_SUCCESS" in out, out[-4000:]
    return out


def test_the_mmaction2_msrvtt_folder_and_a_karpathy_list_through_the_cli(tmp_path):
    files = write_folder(tmp_path / "msrvtt")
    ann = files["ret_test1k"].parent
    _materialize(tmp_path, "raw_msrvtt", {"ops": {"raw_msrvtt": {"config": {
        "paths": [str(ann / "*.json")], "split_scheme": "9k-1kA"}}}})
    st = Storage(str(tmp_path / "root"))
    m = st.read_manifest("raw/msrvtt")
    assert m["rows_in"] == m["rows_kept"] == 10_000 and m["quarantined"] == {}
    x = m["extra"]
    assert x["videos_by_split"] == {"train": 9000, "test": 1000}
    assert x["videos_by_eval_set"] == {"msrvtt_ret_test1k": 1000}
    assert x["mc_test"]["videos_overlapping_training"] == 1990
    assert {s: v["questions"] for s, v in x["qa_by_split"].items()} == QA_COUNTS
    v = verify_raw(st, "msrvtt")
    assert not v.problems and v.counts["mc_entries"] == 2990, v.problems

    coco = tmp_path / "coco"
    coco.mkdir()
    for split, ids in (("train", range(1, 41)), ("val", range(101, 111))):
        doc = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "coco_url": f"http://images.cocodataset.org/{split}2017/{i:012d}.jpg"}
                          for i in ids],
               "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"photo {i} caption {k}"} for i in ids for k in range(5)]}
        (coco / f"captions_{split}2017.json").write_text(json.dumps(doc))
    test_ids = [3, 7, 104]  # two train2017 images and one val2017 image, named as val2014 files
    (coco / "coco_karpathy_test.json").write_text(json.dumps(
        [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": [f"photo {i} caption {k}" for k in range(5)]} for i in test_ids]))
    _materialize(tmp_path, "raw_coco", {"ops": {"raw_coco": {"config": {
        "paths": [str(coco / "captions_*2017.json")], "eval_sets": [str(coco / "coco_karpathy_test.json")]}}}})
    m = st.read_manifest("raw/coco")
    assert m["extra"]["eval_sets"][0] | {"file": None} == {"name": "coco_karpathy_test", "split": "test", "file": None,
                                                         "entries": 3, "distinct_media": 3, "found": 3, "not_found": 0}
    assert m["rows_kept"] == 50
