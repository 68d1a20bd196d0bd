"""A tiny manifest built on the spot: 5 JPEGs in a media shard (materialize_shard) + 1 MP4 in its own tar, a BPE
tokenizer trained on the captions, hd_num 1 and 2 video frames (short sequences, fast on the CPU)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mllm_pipeline.download.images import ImageOptions, fetch_images
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.stages.media import media_index
from mllm_pipeline.manifests import ManifestConfig, ManifestWriter, TokenizeConfig, load_tokenizer
from mllm_pipeline.demo.tokenizer import train_tokenizer
from mllm_pipeline.storage import Storage
from mllm_pipeline.vision.frames import encode_video
from mllm_pipeline_tests.download.conftest import make_jpeg, write_raw_shard

CAPTIONS = ["a dog runs on the beach", "two people ride bikes in the city", "a red car parked near a tree",
            "a plate of food on a wooden table", "children play football in a park", "a cat sleeps on a sofa"]
VIDEO_CAPTION = "waves roll onto a sandy shore at sunset"


def build_manifest(root: Path, hd_num: int = 1, video: bool = True) -> Storage:
    storage = Storage(str(root / "root"))
    sizes = [(96, 72), (64, 96), (80, 80), (120, 60), (70, 90)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        make_jpeg(root / f"img/{i}.jpg", w, h, i)
        paths.append(str(root / f"img/{i}.jpg"))
    raw_uri = write_raw_shard(root / "raw.parquet", [None] * len(paths), paths, dataset="coco")
    opts = ImageOptions(processes=1, threads=1)
    materialize_shard(storage, dataset="coco", shard_key="shard-00000", shard_index=0, raw_uri=raw_uri,
                      raw_version="v1", options=opts.content_options(), fetch=lambda rows, log: fetch_images(rows, log, opts))
    media = media_index(storage, "coco", "shard-00000")
    n = media.num_rows
    tok_dir = train_tokenizer((CAPTIONS + [VIDEO_CAPTION]) * 30, root / "tok", vocab_size=300)
    tok = load_tokenizer(str(tok_dir))
    cfg = ManifestConfig(hd_num=hd_num, video_frames=2, video_hd_num=1, val_fraction=0.0,
                         tokenize=TokenizeConfig(max_seq_len=4096))
    media_ref = {"prefix": "media/coco/shard-00000", "version": storage.read_manifest("media/coco/shard-00000")["version"]}
    with storage.new_version("manifests", inputs=[media_ref]) as version:  # its lineage, as the manifests asset records
        writer = ManifestWriter(storage, version, tok, cfg)
        ids = [f"coco-{i}" for i in range(n)]
        writer.add("coco", pa.table({"sample_id": ids, "caption_index": [0] * n, "caption": CAPTIONS[:n]}), media,
                   pa.table({"sample_id": ids, "split": ["train"] * n, "media_kind": ["image"] * n}))
        if video:
            rng = np.random.default_rng(0)
            frames = rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
            data = encode_video(frames, 6)
            tar_rel = "media/webvid/shard-00000/v1/data.tar"
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tf:
                info = tarfile.TarInfo("000000000.mp4")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            storage.write_bytes(tar_rel, buf.getvalue())
            vmedia = pa.table({"sample_id": ["webvid-0"], "media_tar": [tar_rel], "media_key": ["000000000"],
                               "media_ext": ["mp4"], "width": pa.array([64], pa.int32()),
                               "height": pa.array([48], pa.int32())})
            writer.add("webvid", pa.table({"sample_id": ["webvid-0"], "caption_index": [0], "caption": [VIDEO_CAPTION]}),
                       vmedia, pa.table({"sample_id": ["webvid-0"], "split": ["train"], "media_kind": ["video"]}))
        summary = writer.close()
        for p in Path(tok_dir).iterdir():
            storage.write_bytes(version.rel(f"tokenizer/{p.name}"), p.read_bytes())
        summary["config"] = {"hd_num": hd_num, "video_frames": 2, "video_hd_num": 1, "tokenizer": ""}
        version.commit({"kind": "manifests", "summary": summary})
    return storage


@pytest.fixture(scope="session")
def manifest_root(tmp_path_factory) -> Storage:
    return build_manifest(tmp_path_factory.mktemp("train-data"))
