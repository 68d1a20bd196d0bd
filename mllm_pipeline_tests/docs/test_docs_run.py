"""Every command and config file of the README and the docs/ pages, run as written on tiny files in the documented
layouts (:mod:`mllm_pipeline_tests.docs.sandbox`), in the order a reader meets them; a block that fails fails the
suite. Blocks that cannot run on a test machine carry a ``docs-test`` marker with the reason
(:mod:`mllm_pipeline_tests.docs.blocks`); the first test checks that every other block is run here.

The second test is a newcomer with two of the six datasets, following the README and the end-to-end page alone to
exports and a trained model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.docs import blocks as B
from mllm_pipeline_tests.docs.sandbox import sandbox

#: the order a reader runs the pages in: set up and ingest (README), the whole run, then the reference pages
PAGE_ORDER = ["README.md", "docs/end-to-end.md", "docs/exports.md", "docs/training.md", "docs/media.md",
              "docs/raw.md", "docs/operating.md"]


def test_every_block_runs_or_says_why_not():
    """A block is a config file (``# <name>.yaml``) or commands (``bash``), or it is marked as output or as an
    example with its reason; and every page with run blocks is in the runner's order."""
    problems = []
    for b in B.blocks():
        if b.mark.startswith("example:") and len(b.mark) < len("example: ") + 10:
            problems.append(f"{b}: an example needs its reason")
        if b.runs and not (b.config_name or b.lang == "bash"):
            problems.append(f"{b}: a {b.lang or 'plain'} block that is neither run nor marked")
        if b.expected_failure is not None and b.lang != "bash":
            problems.append(f"{b}: only commands can be shown failing")
        if b.runs and b.page not in PAGE_ORDER:
            problems.append(f"{b}: its page is not in the runner's order")
    assert not problems, "\n".join(problems)
    assert len(B.to_run()) >= 20


def _write_configs(box, only: set[str] | None = None) -> dict[str, str]:
    written = {}
    for b in B.to_run():
        if b.config_name:
            text = box.localize(b.text)
            if only is not None:  # keep the datasets the user has
                doc = yaml.safe_load(text)
                doc["ops"] = {k: v for k, v in doc["ops"].items() if k in only}
                text = yaml.safe_dump(doc)
            (box.work / b.config_name).write_text(text)
            written[b.config_name] = str(b)
    return written


@pytest.fixture(scope="module")
def docs_box(tmp_path_factory, s3_endpoint):
    with sandbox(tmp_path_factory.mktemp("docs"), s3_endpoint) as box:
        yield box


def test_every_documented_command_runs(docs_box):
    box = docs_box
    configs = _write_configs(box)
    ran = set(configs.values())
    for page in PAGE_ORDER:
        for b in B.to_run():
            if b.page == page and b.lang == "bash":
                for command in b.commands():
                    box.run(command, fails_with=b.expected_failure)
                ran.add(str(b))
    assert ran == {str(b) for b in B.to_run()}
    # what the commands made: every raw dataset, the manifests, the four exports and a trained model
    st = Storage(str(box.root))
    for ds in ("cc3m", "webvid", "msrvtt", "coco", "internvid", "cc3m_wds"):
        assert st.read_manifest(f"raw/{ds}")["rows_kept"] > 0, ds
    man = st.read_manifest("manifests")
    assert man["summary"]["splits"]["train"] > 0
    assert {m["dataset"] for m in man["summary"]["missing_shards"]} == {"internvid"}  # its clips come from YouTube
    for fmt in ("videochat2", "ixc2", "internvl", "llava"):
        assert st.read_manifest(f"exports/{fmt}")["manifests_version"] == man["version"]
    assert st.read_manifest("checkpoints/train_mllm")["manifests_version"] == man["version"]
    assert (box.work / "run1" / "metrics.jsonl").is_file()  # the training CLI of docs/training.md


def test_a_newcomer_with_two_datasets_reaches_a_trained_model(tmp_path, s3_endpoint):
    """COCO and CC3M only: the README's real.yaml with the other four datasets left out, then the end-to-end page's
    commands for those two datasets and every cross-dataset stage."""
    with sandbox(tmp_path, s3_endpoint) as box:
        _write_configs(box, only={"raw_cc3m", "raw_coco", "manifests", "train_mllm", "captions_webvid",
                                  "webvid_watermark"})
        steps = [c for b in B.to_run() if b.page in ("README.md", "docs/end-to-end.md") and b.lang == "bash"
                 for c in b.commands()]
        others = re.compile(r"webvid|msrvtt|internvid|cc3m_wds")
        steps = [c for c in steps if not (c.startswith("dagster asset materialize") and others.search(c.split("--select")[1].split()[0]))]
        assert any("images_coco" in c for c in steps) and any("export_llava" in c for c in steps)
        for command in steps:
            box.run(command)
        st = Storage(str(box.root))
        man = st.read_manifest("manifests")
        assert {key.split(".")[0] for key in man["summary"]["by_dataset"]} == {"cc3m", "coco"}  # "<dataset>.<task>.<split>"
        assert not man["summary"]["missing_shards"]
        assert st.current("raw/webvid") is None
        llava = Path(st.read_manifest("exports/llava")["location"])
        assert json.loads((llava / "llava/train_images.json").read_text())
        assert st.read_manifest("checkpoints/train_mllm")["manifests_version"] == man["version"]
