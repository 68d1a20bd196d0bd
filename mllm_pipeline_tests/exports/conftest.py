"""The manifests every export test reads, built with the pipeline's own functions from three media shards:
COCO-style images (read from local files), MSR-VTT-style videos, and CC3M images adopted from
pixparse/cc3m-wds-style tars (no download). One video row and one image row are turned into multi-turn
question-answer conversations, the shape of instruction data in the manifests."""

from __future__ import annotations

import io
import json
import random
import tarfile
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
from mllm_pipeline.manifests import ManifestConfig, ManifestWriter, TokenizeConfig, load_tokenizer
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


QA_IMAGE = [{"from": "human", "value": "<image>\nwhat colour is the car?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "is it parked?"}, {"from": "gpt", "value": "yes, near a tree"}]


@pytest.fixture(scope="package")
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
        rows = train.to_pylist()
        for sid, qa in (("msrvtt-1#0", QA), ("coco-3#0", QA_IMAGE)):
            i = ids.index(sid)
            rows[i]["conversations"], rows[i]["caption"] = json.dumps(qa), qa[-1]["value"]
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


