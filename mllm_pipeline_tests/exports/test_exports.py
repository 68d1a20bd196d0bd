"""Round trips: each export is read back by a small reader written from its consumer's documented schema (the
fields and path rules its dataset class reads), and every record must open its media, carry the manifest's text,
and add up to the manifest's counts.

The manifest is built with the pipeline's own functions from three media shards: COCO-style images (read from
local files), MSR-VTT-style videos, and CC3M images adopted from pixparse/cc3m-wds-style tars (no download). One
video row is turned into a question-answer conversation, the shape of instruction data in the manifests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mllm_pipeline.download.adopt import ADOPT_OPTIONS, adopt_from_tars
from mllm_pipeline.download.images import ImageOptions, fetch_images
from mllm_pipeline.download.fetched import Fetched
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.stages.media import media_index
from mllm_pipeline.stages.exports import ExportConfig, build_export
from mllm_pipeline.manifests import ManifestConfig, ManifestWriter, TokenizeConfig, load_tokenizer, media_bytes
from mllm_pipeline.manifests.conversation import DEFAULT_IMAGE_INSTRUCTIONS, DEFAULT_VIDEO_INSTRUCTIONS
from mllm_pipeline.demo.tokenizer import train_tokenizer
from mllm_pipeline.sources.cc3m_wds import ingest_cc3m_wds
from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import make_jpeg, write_raw_shard

CAPTIONS = ["a dog runs on the beach", "two people ride bikes in the city", "a red car parked near a tree",
            "a plate of food on a wooden table", "children play football in a park", "a man cooks in a kitchen"]
QA = [{"from": "human", "value": "<video>\nwhat is the man doing?"}, {"from": "gpt", "value": "cooking"},
      {"from": "human", "value": "where is he?"}, {"from": "gpt", "value": "in a kitchen"}]
SPLITS = ("train", "val", "test")


def _mp4(path: Path, seed: int) -> None:
    from mllm_pipeline.demo.generate import write_mp4

    write_mp4(path, 1, random.Random(seed))


def _wds_tar(path: Path, start: int, n: int, corrupt: int | None = None) -> None:
    """A pixparse/cc3m-wds-style shard: <key>.jpg, <key>.txt, <key>.json per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            make_jpeg(path.parent / ".tmp.jpg", 200 + 10 * i, 150, i)
            jpg = (path.parent / ".tmp.jpg").read_bytes()
            if i == corrupt:
                jpg = jpg[: len(jpg) // 3]  # truncated: stored, but does not decode
            caption = CAPTIONS[i % len(CAPTIONS)] + f" number {i}"
            for ext, data in (("jpg", jpg), ("txt", caption.encode()), ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (path.parent / ".tmp.jpg").unlink()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exports")
    storage = Storage(str(tmp / "root"))
    tok = load_tokenizer(str(train_tokenizer(CAPTIONS * 40, tmp / "tok", vocab_size=400)))
    # images from local files (coco)
    paths = []
    for i in range(4):
        make_jpeg(tmp / f"img/{i}.jpg", 320 + 40 * i, 240, i)
        paths.append(str(tmp / f"img/{i}.jpg"))
    opts = ImageOptions(processes=1, threads=2)
    materialize_shard(storage, dataset="coco", shard_key="shard-00000", shard_index=0,
                      raw_uri=write_raw_shard(tmp / "raw_coco.parquet", [None] * 4, paths, dataset="coco"),
                      raw_version="v1", options=opts.content_options(), fetch=lambda rows, log: fetch_images(rows, log, opts))
    # videos (msrvtt): the files a video downloader would have stored
    for i in range(3):
        _mp4(tmp / f"vid/{i}.mp4", i)

    def fetch_videos(rows, log):
        for r in rows:
            yield Fetched(r["row"], True, media=("mp4", (tmp / f"vid/{r['row']}.mp4").read_bytes()), width=128, height=72,
                          duration_s=1.0)

    raw_v = write_raw_shard(tmp / "raw_msrvtt.parquet", [f"https://example.invalid/{i}.mp4" for i in range(3)], dataset="msrvtt")
    materialize_shard(storage, dataset="msrvtt", shard_key="shard-00000", shard_index=0, raw_uri=raw_v, raw_version="v1",
                      options={"test": 1}, fetch=fetch_videos)
    # pre-downloaded CC3M: two webdataset tars, one truncated JPEG among them
    _wds_tar(tmp / "wds/cc3m-train-0000.tar", 0, 3)
    _wds_tar(tmp / "wds/cc3m-train-0001.tar", 3, 3, corrupt=4)
    report = ingest_cc3m_wds(str(tmp / "wds"), storage, rows_per_shard=100)
    assert report.rows_kept == 6
    (raw,) = raw_shards(storage, "cc3m_wds")
    adopted = materialize_shard(storage, dataset="cc3m_wds", shard_key="shard-00000", shard_index=0, raw_uri=raw.uri,
                                raw_version=raw.raw_version, rows_digest=raw.digest("media"), options=ADOPT_OPTIONS,
                                fetch=adopt_from_tars)
    wds_raw = pq.read_table(raw.uri)

    cfg = ManifestConfig(hd_num=4, val_fraction=0.0, tokenize=TokenizeConfig(max_seq_len=4000))
    with storage.new_version("manifests") as version:
        writer = ManifestWriter(storage, version, tok, cfg)
        writer.add("coco", pa.table({"sample_id": ["coco-0", "coco-0", "coco-1", "coco-2", "coco-3"],
                                     "caption_index": [0, 1, 0, 0, 0], "caption": CAPTIONS[:5]}),
                   media_index(storage, "coco", "shard-00000"),
                   pa.table({"sample_id": [f"coco-{i}" for i in range(4)], "split": ["train", "train", "val", "train"],
                             "media_kind": ["image"] * 4}))
        writer.add("msrvtt", pa.table({"sample_id": ["msrvtt-0", "msrvtt-1", "msrvtt-2"], "caption_index": [0, 0, 0],
                                       "caption": CAPTIONS[3:6]}),
                   media_index(storage, "msrvtt", "shard-00000"),
                   pa.table({"sample_id": [f"msrvtt-{i}" for i in range(3)], "split": ["train", "train", "test"],
                             "media_kind": ["video"] * 3}))
        writer.add("cc3m_wds", pa.table({"sample_id": wds_raw["sample_id"], "caption_index": [0] * wds_raw.num_rows,
                                         "caption": pc.list_element(wds_raw["captions"], 0)}),
                   media_index(storage, "cc3m_wds", "shard-00000"),
                   pa.table({"sample_id": wds_raw["sample_id"], "split": ["train"] * wds_raw.num_rows,
                             "media_kind": ["image"] * wds_raw.num_rows}))
        summary = writer.close()
        # one video row becomes a two-turn question-answer conversation (instruction data in the manifests)
        train = pq.read_table(storage._p(version.rel("train.parquet")))
        ids = train["id"].to_pylist()
        i = ids.index("msrvtt-1#0")
        rows = train.to_pylist()
        rows[i]["conversations"], rows[i]["caption"] = json.dumps(QA), QA[-1]["value"]
        with storage.open(version.rel("train.parquet"), "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=train.schema), f)
        summary["config"] = {"image_instructions": list(DEFAULT_IMAGE_INSTRUCTIONS),
                             "video_instructions": list(DEFAULT_VIDEO_INSTRUCTIONS)}
        man = version.commit({"kind": "manifests", "summary": summary})

    def log_info(*_):
        pass

    log = type("Log", (), {"info": staticmethod(log_info), "warning": staticmethod(log_info)})()
    exports = {fmt: build_export(storage, fmt, ExportConfig(), log)[0] for fmt in ("videochat2", "ixc2", "internvl", "llava")}
    return storage, man, exports, adopted, log


def _manifest(storage: Storage, man) -> dict[tuple[str, str], Counter]:
    """(split, dataset) -> Counter of (answer, sha256 of the media bytes in the committed shard)."""
    out: dict[tuple[str, str], Counter] = {}
    for split in SPLITS:
        rel = f"manifests/{man['version']}/{split}.parquet"
        if not storage.exists(rel):
            continue
        for r in storage.read_parquet(rel).to_pylist():
            answer = json.loads(r["conversations"])[-1]["value"]
            data = media_bytes(storage, r["media_tar"], r["media_key"], r["media_ext"])
            out.setdefault((split, r["dataset"]), Counter())[(answer, hashlib.sha256(data).hexdigest())] += 1
    return out


def _open_media(path: str, kind: str) -> str:
    """Open a medium as the consumer would (Pillow for images, a decoded frame for videos); its sha256."""
    assert os.path.isabs(path) and os.path.isfile(path), path
    if kind == "image":
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    else:
        import av

        with av.open(path) as c:
            next(c.decode(video=0))
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _kind(rec: dict) -> tuple[str, str]:
    assert ("image" in rec) != ("video" in rec), rec
    return ("image", rec["image"]) if "image" in rec else ("video", rec["video"])


# -- readers, one per consumer, from its documented schema ---------------------------------------------------


def read_videochat2(export) -> tuple[dict, dict]:
    """configs/data.py-style entries [anno_path, data_root(, "video")]; a caption record is {"image"|"video": path
    relative to data_root, "caption"}; an instruction record has "QA": [{"i", "q", "a"}] instead."""
    snippet: dict = {}
    exec(Path(export["location"], "videochat2_data.py").read_text(), snippet)  # the config lines a user pastes
    captions, qa = {}, {}
    for corpus, table in ((snippet["pretrain_corpus"], captions), (snippet["instruction_corpus"], qa)):
        for name, entry in corpus.items():
            anno, root = entry[0], entry[1]
            media_type = entry[2] if len(entry) > 2 else "image"
            assert "/annotation/videos_images/" in anno
            dataset, split = name.rsplit("_", 1)
            got = Counter()
            for rec in json.loads(Path(anno).read_text()):
                kind, rel = _kind(rec)
                assert kind == media_type and not os.path.isabs(rel)
                if "QA" in rec:
                    assert rec["QA"] and all(set(t) == {"i", "q", "a"} for t in rec["QA"])
                    text = rec["QA"][-1]["a"]
                else:
                    assert isinstance(rec["caption"], str)
                    text = rec["caption"]
                got[(text, _open_media(os.path.join(root, rel), kind))] += 1
            table[(split, dataset)] = got
    return captions, qa


def read_ixc2(export) -> dict:
    """data.txt: `<json path> <samples in thousands>` lines; each JSON: [{"id", "image": [paths], "conversations":
    [{"from": "user", "value": "<ImageHere>..."}, {"from": "assistant", ...}]}], one <ImageHere> per image."""
    out = {}
    for split in SPLITS:
        txt = Path(export["location"], "ixc2", f"data_{split}.txt")
        if not txt.exists():
            continue
        for line in txt.read_text().splitlines():
            path, k = line.rsplit(" ", 1)
            records = json.loads(Path(path).read_text())
            assert round(float(k) * 1000) == len(records)
            dataset = Path(path).stem.rsplit("_", 1)[0]
            got = Counter()
            for rec in records:
                assert isinstance(rec["id"], str) and isinstance(rec["image"], list)
                turns = rec["conversations"]
                assert [t["from"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
                assert sum(t["value"].count("<ImageHere>") for t in turns) == len(rec["image"]) == 1
                assert "<image>" not in json.dumps(turns)
                got[(turns[-1]["value"], _open_media(rec["image"][0], "image"))] += 1
            out[(split, dataset)] = got
    return out


def read_internvl(export) -> dict:
    """meta JSON {name: {root, annotation, data_augment, repeat_time, length}}; the annotation is JSON lines of
    {"id", "image"|"video": path relative to root, "conversations": human/gpt with one <image> / <video>}."""
    out = {}
    for split in SPLITS:
        meta_path = Path(export["location"], "internvl", f"meta_{split}.json")
        if not meta_path.exists():
            continue
        for name, meta in json.loads(meta_path.read_text()).items():
            assert set(meta) == {"root", "annotation", "data_augment", "repeat_time", "length"}
            assert meta["data_augment"] is False and meta["repeat_time"] == 1
            lines = Path(meta["annotation"]).read_text().splitlines()
            assert len(lines) == meta["length"]
            got = Counter()
            for line in lines:
                rec = json.loads(line)
                kind, rel = _kind(rec)
                turns = rec["conversations"]
                assert turns[0]["from"] == "human" and turns[-1]["from"] == "gpt"
                assert sum(t["value"].count(f"<{kind}>") for t in turns) == 1
                got[(turns[-1]["value"], _open_media(os.path.join(meta["root"], rel), kind))] += 1
            out[(split, name.rsplit("_", 1)[0])] = got
    return out


def read_llava(export, records_dataset) -> dict:
    """LLaVA: --data_path <json> --image_folder <root>; Video-LLaVA adds --video_folder: [{"id", "image"|"video":
    path relative to the folder, "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt"}]}]."""
    root = export["summary"]["media_root"]
    out = {}
    for split in SPLITS:
        for kind in ("image", "video"):
            p = Path(export["location"], "llava", f"{split}_{kind}s.json")
            if not p.exists():
                continue
            for rec in json.loads(p.read_text()):
                k, rel = _kind(rec)
                assert k == kind and rec["conversations"][0]["value"].startswith(f"<{kind}>\n")
                key = (split, records_dataset[rec["id"]])
                out.setdefault(key, Counter())[(rec["conversations"][-1]["value"], _open_media(os.path.join(root, rel), kind))] += 1
    return out


# -- the round trips -----------------------------------------------------------------------------------------


def test_videochat2_round_trip(built):
    storage, man, exports, _, _ = built
    expected = _manifest(storage, man)
    captions, qa = read_videochat2(exports["videochat2"])
    assert captions == expected and qa == expected
    # the question-answer row exports as QA turns; caption rows as an instruction with an empty question
    recs = json.loads(Path(exports["videochat2"]["location"], "annotation/videos_images/msrvtt/instruction_train.json").read_text())
    turns = [r["QA"] for r in recs if len(r["QA"]) == 2]
    assert turns == [[{"i": "Watch the video carefully and answer the question.", "q": "what is the man doing?", "a": "cooking"},
                      {"i": "Watch the video carefully and answer the question.", "q": "where is he?", "a": "in a kitchen"}]]
    single = [r["QA"][0] for r in recs if len(r["QA"]) == 1]
    assert single and all(t["q"] == "" and t["i"] in DEFAULT_VIDEO_INSTRUCTIONS for t in single)


def test_ixc2_round_trip_images_only(built):
    storage, man, exports, _, _ = built
    expected = {k: v for k, v in _manifest(storage, man).items() if k[1] != "msrvtt"}
    assert read_ixc2(exports["ixc2"]) == expected
    skipped = exports["ixc2"]["summary"]["skipped"]
    assert {(s["split"], s["dataset"], s["rows"]) for s in skipped} == {("train", "msrvtt", 2), ("test", "msrvtt", 1)}
    assert Path(exports["ixc2"]["location"], "ixc2/data.txt").read_text() == Path(exports["ixc2"]["location"], "ixc2/data_train.txt").read_text()


def test_internvl_round_trip(built):
    storage, man, exports, _, _ = built
    assert read_internvl(exports["internvl"]) == _manifest(storage, man)


def test_llava_round_trip(built):
    storage, man, exports, _, _ = built
    datasets = {}
    for split in SPLITS:
        rel = f"manifests/{man['version']}/{split}.parquet"
        if storage.exists(rel):
            t = storage.read_parquet(rel, ["id", "dataset"])
            datasets.update(zip(t["id"].to_pylist(), t["dataset"].to_pylist()))
    assert read_llava(exports["llava"], datasets) == _manifest(storage, man)


def test_exports_name_their_manifests_and_share_the_media(built):
    storage, man, exports, _, log = built
    expected_counts = Counter()
    for key, c in _manifest(storage, man).items():
        expected_counts[key] = sum(c.values())
    for fmt, e in exports.items():
        assert e["manifests_version"] == man["version"]
        assert {"prefix": "manifests", "version": man["version"]} in e["inputs"]
        media = [r for r in e["inputs"] if r["prefix"].startswith("exports/media/")]
        assert len(media) == 3  # one extraction per media shard, read by every export
        assert json.loads(Path(e["location"], "export.json").read_text())["manifests_version"] == man["version"]
        got = {(r["split"], r["dataset"]): r["records"] for r in e["summary"]["records"]}
        skipped = sum(s["rows"] for s in e["summary"]["skipped"])
        assert sum(got.values()) + skipped == sum(expected_counts.values()), fmt
    # the same manifests and config again: nothing is written
    again, up_to_date = build_export(storage, "internvl", ExportConfig(), log)
    assert up_to_date and again["version"] == exports["internvl"]["version"]


def test_copy_mode_is_self_contained(built):
    storage, man, exports, _, log = built
    copied, _ = build_export(storage, "internvl", ExportConfig(media="copy"), log)
    assert copied["version"] != exports["internvl"]["version"]
    assert copied["summary"]["media_root"].startswith(copied["location"])
    assert not [r for r in copied["inputs"] if r["prefix"].startswith("exports/media/")]
    assert read_internvl(copied) == _manifest(storage, man)


def test_predownloaded_cc3m_is_adopted_with_the_same_accounting(built):
    storage, man, _, adopted, _ = built
    s = adopted.summary
    assert (s["attempted"], s["succeeded"], s["failed_by_reason"]) == (6, 5, {"decode_error": 1})
    status = storage.read_parquet(f"media/cc3m_wds/shard-00000/{adopted.manifest['version']}/samples.parquet")
    assert status.num_rows == 6 and status.filter(pc.equal(status["status"], "failed"))["detail"].to_pylist()[0].startswith("000000004.jpg")
    # adopted, not downloaded: the stored image bytes are the source tar's
    idx = media_index(storage, "cc3m_wds", "shard-00000")
    first = idx.filter(pc.equal(idx["sample_id"], "cc3m-wds-train-000000000")).to_pylist()[0]
    with tarfile.open(Path(storage.root).parent / "wds/cc3m-train-0000.tar") as tf:
        assert media_bytes(storage, first["media_tar"], first["media_key"], "jpg") == tf.extractfile("000000000.jpg").read()
