"""The read-back checks pass on untouched committed outputs and fail, naming what is missing, when a committed
output is corrupted on purpose (a dropped row, a truncated shard, a deleted or undecodable tar member, a removed
caption or manifest row)."""

from __future__ import annotations

import glob
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mllm_pipeline.download.images import ImageOptions, fetch_images
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.manifests import ManifestConfig
from mllm_pipeline.demo.tokenizer import train_tokenizer
from mllm_pipeline.manifests.tokenization import load_tokenizer
from mllm_pipeline.stages.manifests import build_manifests, plan_inputs
from mllm_pipeline.sources.coco import ingest_coco
from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.storage import Storage
from mllm_pipeline.text import CleanConfig
from mllm_pipeline.stages.captions import clean_and_commit
from mllm_pipeline.stages.dedup import dedup_and_commit
from mllm_pipeline.stages.media_hashes import hash_all
from mllm_pipeline.vision.media_hash import HashConfig
from mllm_pipeline.stages.verify import verify_caption_shard, verify_manifests, verify_media_shard, verify_raw
from mllm_pipeline_tests.download.conftest import make_jpeg

log = logging.getLogger("test_verify")
RAW_DATASETS = ("cc3m", "cc3m_wds", "webvid", "msrvtt", "coco", "internvid")
WORDS = ["dog", "beach", "car", "tree", "bike", "city", "table", "park", "river", "boat", "train", "cake"]


def ingest_demo(root: Path, corpus: Path) -> Storage:
    """Every raw dataset of the embedded demo corpus, ingested as the raw assets do."""
    from mllm_pipeline.demo.config import raw_run_config
    from mllm_pipeline.demo.generate import generate_demo_corpus
    from mllm_pipeline.sources.cc3m import ingest_cc3m
    from mllm_pipeline.sources.cc3m_wds import ingest_cc3m_wds, list_shards
    from mllm_pipeline.sources.internvid import ingest_internvid
    from mllm_pipeline.sources.msrvtt import ingest_msrvtt
    from mllm_pipeline.stages.raw import ingest_versioned
    from mllm_pipeline.sources.webvid import ingest_webvid

    generate_demo_corpus(corpus)
    ops = raw_run_config(corpus)["ops"]
    st = Storage(str(root))
    for name, ingest in (("raw_cc3m", ingest_cc3m), ("raw_webvid", ingest_webvid), ("raw_msrvtt", ingest_msrvtt),
                         ("raw_coco", ingest_coco), ("raw_internvid", ingest_internvid)):
        options = dict(ops[name]["config"])
        paths = [x for p in options.pop("paths") for x in (sorted(glob.glob(p)) if "*" in p else [p])]
        ingest_versioned(ingest, paths, st, prefix=f"raw/{name[4:]}", files=paths, options={**options, "rows_per_shard": 16})
    directory = ops["raw_cc3m_wds"]["config"]["directory"]
    ingest_versioned(ingest_cc3m_wds, directory, st, prefix="raw/cc3m_wds", files=list_shards(directory), options={})
    return st


def coco_pipeline(root: Path, src: Path) -> Storage:
    """A small COCO run through every stage, with local images: 8 images, one of them not a JPEG (its media
    fails), one caption repeated (de-duplicated), 3 captions each."""
    images = []
    for i in range(1, 9):
        name = f"{i:012d}.jpg"
        images.append({"id": i, "file_name": name, "width": 64, "height": 48})
        if i == 5:
            (src / "images/train2017").mkdir(parents=True, exist_ok=True)
            (src / "images/train2017" / name).write_bytes(b"<html>not an image</html>")
        else:
            make_jpeg(src / "images/train2017" / name, 64, 48, seed=i)
    annotations = []
    for i in range(1, 9):
        for j in range(3):
            text = f"a {WORDS[i]} next to the {WORDS[(i + j + 3) % len(WORDS)]} in the morning light number {j}"
            annotations.append({"id": 100 * i + j, "image_id": i, "caption": text})
    annotations.append({"id": 999, "image_id": 7, "caption": annotations[0]["caption"]})  # a duplicate in another shard
    (src / "annotations").mkdir(parents=True, exist_ok=True)
    ann = src / "annotations/captions_train2017.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    st = Storage(str(root))
    ingest_coco([str(ann)], st, images_dir=str(src / "images"), rows_per_shard=4)
    options = ImageOptions()
    cfg = CleanConfig()
    for raw in raw_shards(st, "coco"):
        key = f"shard-{raw.index:05d}"
        materialize_shard(st, dataset="coco", shard_key=key, shard_index=raw.index, raw_uri=raw.uri,
                          raw_version=raw.raw_version, rows_digest=raw.digest("media"), options=options.content_options(),
                          fetch=lambda rows, lg: fetch_images(rows, lg, options))
        clean_and_commit(st, "coco", key, raw, cfg, log)
    hash_all(st, HashConfig(), 1, log)
    dedup_and_commit(st, cfg, log)
    plan = plan_inputs(st, ["coco"], log)
    with st.new_version("manifests", {"test": "manifests"}, inputs=plan.refs()) as version:
        texts = [a["caption"] for a in annotations] * 20
        tok = load_tokenizer(str(train_tokenizer(texts, root / "tokenizer", vocab_size=300)))
        summary, inputs, _ = build_manifests(st, version, tok, ManifestConfig(hd_num=1), plan, log)
        version.commit({"kind": "manifests", "summary": summary, "shard_inputs": inputs})
    return st


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("demo")
    ingest_demo(base / "root", base / "corpus")
    return base / "root"


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("coco")
    coco_pipeline(base / "root", base / "src")
    return base / "root"


@pytest.fixture
def copy_of(tmp_path):
    """A copy of a committed storage root, to corrupt without touching the shared one."""
    def copy(root: Path) -> Storage:
        shutil.copytree(root, tmp_path / "root")
        return Storage(str(tmp_path / "root"))
    return copy


def _current(st: Storage, prefix: str) -> Path:
    return Path(st.root) / prefix / st.read_manifest(prefix)["version"]


def _drop_rows(path: Path, keep) -> list[dict]:
    """Rewrite a committed Parquet file without the rows where ``keep`` is false; returns the dropped rows."""
    t = pq.read_table(path)
    mask = keep(t)
    pq.write_table(t.filter(mask), path)
    return t.filter(pc.invert(mask)).to_pylist()


# -- raw ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", RAW_DATASETS)
def test_raw_passes_on_the_demo(demo_raw, dataset):
    v = verify_raw(Storage(str(demo_raw)), dataset)
    assert v.passed, v.message
    assert v.counts["source_records"] == v.counts["raw_rows"] + v.counts.get("quarantined", 0) > 0


def test_raw_fails_naming_the_line_of_a_dropped_row(demo_raw, copy_of):
    st = copy_of(demo_raw)
    shard = _current(st, "raw/cc3m") / "shard-00000.parquet"
    gone = _drop_rows(shard, lambda t: pc.not_equal(t["sample_id"], t["sample_id"][3]))
    v = verify_raw(st, "cc3m")
    assert not v.passed
    assert f"{gone[0]['source_file']}: line {gone[0]['source_line']} is in neither the raw shards nor the quarantine" in v.message
    assert "holds 15 rows, its manifest says 16" in v.message


def test_raw_fails_on_a_truncated_shard(demo_raw, copy_of):
    st = copy_of(demo_raw)
    shard = _current(st, "raw/webvid") / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    v = verify_raw(st, "webvid")
    assert not v.passed
    assert "raw shard shard-00000.parquet cannot be read" in v.message
    assert "is in neither the raw shards nor the quarantine" in v.message  # its lines are now unaccounted for


def test_raw_fails_naming_a_json_record_and_a_lost_quarantine_row(demo_raw, copy_of):
    st = copy_of(demo_raw)
    base = _current(st, "raw/coco")
    gone = _drop_rows(base / "shard-00000.parquet", lambda t: pc.not_equal(t["sample_id"], t["sample_id"][0]))
    v = verify_raw(st, "coco")
    assert not v.passed and f"({gone[0]['sample_id']}) is in neither the raw shards nor the quarantine" in v.message
    q = _current(st, "raw/internvid") / st.read_manifest("raw/internvid")["quarantine"][0]
    lost = _drop_rows(q, lambda t: pc.not_equal(t["line"], t["line"][0]))
    v = verify_raw(st, "internvid")
    assert not v.passed and f"line {lost[0]['line']} is in neither" in v.message


def test_raw_fails_when_the_source_changed_since_ingest(demo_raw, copy_of):
    st = copy_of(demo_raw)
    src = st.read_manifest("raw/webvid")["sources"][0]
    original = Path(src).read_bytes()
    try:
        Path(src).write_bytes(original + b'1,"http://x.org/a.mp4",PT00H00M09S,a new clip,1\n')
        v = verify_raw(st, "webvid")
        assert not v.passed and "changed since it was ingested" in v.message
    finally:
        Path(src).write_bytes(original)


# -- media -------------------------------------------------------------------------------------------------------

def test_media_passes_and_counts_the_failed_sample(coco_run):
    st = Storage(str(coco_run))
    verdicts = [verify_media_shard(st, "coco", k) for k in ("shard-00000", "shard-00001")]
    assert all(v.passed for v in verdicts), [v.message for v in verdicts]
    assert sum(v.counts["succeeded"] for v in verdicts) == 7 and sum(v.counts["failed"] for v in verdicts) == 1


def _rewrite_tar(path: Path, change) -> None:
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            data = change(m.name, data)
            if data is None:
                continue
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_media_fails_naming_a_deleted_member(coco_run, copy_of):
    st = copy_of(coco_run)
    _rewrite_tar(_current(st, "media/coco/shard-00000") / "media.tar", lambda n, d: None if n == "00000_00001.jpg" else d)
    v = verify_media_shard(st, "coco", "shard-00000")
    assert not v.passed
    assert "00000_00001.jpg (coco-2) is marked success but is not in media.tar" in v.message


def test_media_fails_naming_a_member_that_does_not_decode(coco_run, copy_of):
    st = copy_of(coco_run)
    _rewrite_tar(_current(st, "media/coco/shard-00000") / "media.tar",
                 lambda n, d: d[: len(d) // 3] if n == "00000_00002.jpg" else d)
    v = verify_media_shard(st, "coco", "shard-00000")
    assert not v.passed and "00000_00002.jpg (coco-3) is in media.tar but does not decode" in v.message


def test_media_fails_naming_a_raw_row_missing_from_the_status_table(coco_run, copy_of):
    st = copy_of(coco_run)
    _drop_rows(_current(st, "media/coco/shard-00001") / "samples.parquet", lambda t: pc.not_equal(t["row"], 2))
    v = verify_media_shard(st, "coco", "shard-00001")
    assert not v.passed and "raw row 2 (coco-7) is not in the status table" in v.message


# -- captions ----------------------------------------------------------------------------------------------------

def test_captions_pass_and_fail_naming_a_removed_kept_caption(coco_run, copy_of):
    st = Storage(str(coco_run))
    for key in ("shard-00000", "shard-00001"):
        v = verify_caption_shard(st, "coco", key)
        assert v.passed, v.message
        assert v.counts["raw_captions"] == v.counts["kept"] + v.counts["rejected"] > 0
    st = copy_of(coco_run)
    kept = _current(st, "captions/coco/shard-00000") / "kept.parquet"
    gone = _drop_rows(kept, lambda t: pc.invert(pc.and_(pc.equal(t["sample_id"], "coco-3"), pc.equal(t["caption_index"], 1))))
    v = verify_caption_shard(st, "coco", "shard-00000")
    assert not v.passed
    assert f"caption 1 of coco-3 ({gone[0]['caption_raw'][:60]!r}) is in neither kept nor rejected" in v.message


# -- manifests ---------------------------------------------------------------------------------------------------

def test_manifests_pass_and_fail_naming_a_lost_caption(coco_run, copy_of):
    v = verify_manifests(Storage(str(coco_run)))
    assert v.passed, v.message
    # coco-5's media failed; identical captions of different images are both kept (nothing de-duplicated)
    assert v.counts["without_media"] == 3 and v.counts.get("deduplicated", 0) == 0
    assert v.counts["in_manifests"] + v.counts["rejected"] == v.counts["expected"] > 0
    st = copy_of(coco_run)
    train = _current(st, "manifests") / "train.parquet"
    gone = _drop_rows(train, lambda t: pc.not_equal(t["id"], t["id"][0]))
    v = verify_manifests(st)
    assert not v.passed
    assert f"{gone[0]['id']} (a kept caption with usable media) is in no manifest split and not in rejected.parquet" in v.message


# -- MSR-VTT with its split lists and MSRVTT-QA ------------------------------------------------------------------


def _bundle_raw(tmp_path: Path, sentence_elsewhere: bool = False, unknown_in_list: bool = False) -> tuple[Storage, dict]:
    """The CLIP4Clip / EMCL bundle (``MSRVTT_data.json``, ``MSRVTT_train.9k.csv``, ``MSRVTT_JSFUSION_test.csv``) and
    MSRVTT-QA's ``{train,val,test}_qa.json``, as ``mllm_pipeline_tests/sources/msrvtt_bundle.py`` writes them."""
    from mllm_pipeline.sources.msrvtt import ingest_msrvtt
    from mllm_pipeline_tests.sources.msrvtt_bundle import write_bundle

    b = write_bundle(tmp_path / "msrvtt")
    if sentence_elsewhere:  # a 1k-A sentence that is none of the video's 20 captions: it is added, as the 21st
        b["test"].write_text(b["test"].read_text().replace("video 22 caption 3 a person", "someone else entirely in 22"))
    if unknown_in_list:  # a 9k-list line naming a video the annotation does not have: set aside by its line
        b["9k"].write_text(b["9k"].read_text() + "video999\n")
    st = Storage(str(tmp_path / "root"))
    ingest_msrvtt([str(b["data"])], st, split_scheme="9k-1kA", train_list=str(b["9k"]), test_list=str(b["test"]),
                  qa_paths=[str(b[f"qa_{s}"]) for s in ("train", "val", "test")])
    return st, b


@pytest.mark.parametrize("sentence_elsewhere", [False, True])
def test_raw_passes_on_the_msrvtt_bundle_with_split_lists_and_questions(tmp_path, sentence_elsewhere):
    st, _ = _bundle_raw(tmp_path, sentence_elsewhere)
    v = verify_raw(st, "msrvtt")
    assert v.passed, v.message
    assert v.counts["split_list_lines"] == 26 + 4 and v.counts["qa_entries"] == 60 and v.counts["raw_rows"] == 30


def test_raw_fails_on_a_lost_question_and_an_unaccounted_split_list_line(tmp_path):
    st, b = _bundle_raw(tmp_path, unknown_in_list=True)
    assert verify_raw(st, "msrvtt").passed
    shard = _current(st, "raw/msrvtt") / "shard-00000.parquet"
    t = pq.read_table(shard)
    qa = t["qa"].to_pylist()
    qa[0] = qa[0][1:]  # one question fewer on the first row
    pq.write_table(t.set_column(t.column_names.index("qa"), "qa", pa.array(qa, t.schema.field("qa").type)), shard)
    v = verify_raw(st, "msrvtt")
    assert not v.passed and "the raw rows carry 59 question/answer pair(s), the MSRVTT-QA files give 60" in v.message
    q = _current(st, "raw/msrvtt") / st.read_manifest("raw/msrvtt")["quarantine"][0]
    lost = _drop_rows(q, lambda t: pc.invert(pc.equal(t["source_file"], str(b["9k"]))))
    assert [(r["line"], r["reason"]) for r in lost] == [(28, "unknown_video")]  # header + 26 videos, then the bad one
    v = verify_raw(st, "msrvtt")
    assert f"{b['9k']}: line 28 names no video of the annotation and is not in the quarantine" in v.message


def test_manifests_name_the_shards_they_cannot_read(coco_run, copy_of, caplog):
    """A raw shard without committed media and captions is never silently left out: named in the log and the
    plan when the datasets were found on their own; a stop naming the partitions when the config named them."""
    from mllm_pipeline.stages.manifests import InconsistentInputs

    st = copy_of(coco_run)
    (Path(st.root) / "captions/coco/shard-00001/_manifest.json").unlink()  # shard 1 never got its clean captions
    with caplog.at_level(logging.WARNING):
        plan = plan_inputs(st, ["coco"], logging.getLogger("test"))
    assert plan.missing == [{"dataset": "coco", "raw_shards": 2, "built": 1, "missing": 1, "which": "shard-00001"}]
    assert "coco: 1 of raw_coco's 2 shard(s) have no committed media and captions (shard-00001)" in caplog.text
    assert [s.key for s in plan.shards] == ["shard-00000"]
    with pytest.raises(InconsistentInputs, match=r"materialize images_coco and captions_coco for those partitions, "
                                                 r"or leave coco out of the config's datasets"):
        plan_inputs(st, ["coco"], logging.getLogger("test"), require_all=True)
