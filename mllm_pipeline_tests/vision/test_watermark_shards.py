"""The watermark stage on a committed WebVid media shard: drop, mask and remove, and what the manifests then see."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mllm_pipeline.download.fetched import Fetched
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.stages.media import iter_shard, media_index, read_status
from mllm_pipeline.storage import Storage
from mllm_pipeline.vision import WatermarkConfig, encode_video
from mllm_pipeline_tests.vision.synthetic import moving_content, webvid_mark
from mllm_pipeline.stages.watermark import score_and_commit, watermark_view

W, H, T = 160, 96, 24


class _Log:
    def info(self, *_):
        pass

    warning = info


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """A WebVid media shard of 12 clips, 8 carrying the shared mark at opacity 0.4."""
    rng = np.random.default_rng(3)
    mark = webvid_mark(W, H, 0.4)
    clips = [encode_video(mark.apply(f) if i < 8 else f, 8) for i, f in
             enumerate(moving_content(W, H, T, rng) for _ in range(12))]
    tmp = tmp_path_factory.mktemp("wm")
    raw = tmp / "raw.parquet"
    n = len(clips)
    pa.parquet.write_table(pa.table({"sample_id": [f"webvid-{i}" for i in range(n)], "captions": [[f"clip {i}"] for i in range(n)],
                                     "url": [f"http://example.com/{i}.mp4" for i in range(n)]}), raw)

    def fetch(rows, log):
        for r in rows:
            yield Fetched(r["row"], True, media=("mp4", clips[r["row"]]), width=W, height=H, duration_s=T / 8)

    root = tmp / "root"
    materialize_shard(Storage(str(root)), dataset="webvid", shard_key="shard-00000", shard_index=0, raw_uri=str(raw),
                      raw_version="v1", options={}, fetch=fetch)
    return root


def _view(root, mode):
    st = Storage(str(root))
    out = score_and_commit(st, "shard-00000", WatermarkConfig(), mode, "alpha", _Log())
    return st, out, watermark_view(st, "shard-00000", media_index(st, "webvid", "shard-00000"),
                                   st.current("curated/webvid_watermark/shard-00000"))


def test_drop_leaves_out_the_marked_clips(shard):
    st, out, (media, note) = _view(shard, "drop")
    assert out["summary"]["clips"] == 12 and out["summary"]["flagged"] == 8 and out["summary"]["dropped"] == 8
    assert set(media["sample_id"].to_pylist()) == {f"webvid-{i}" for i in range(8, 12)}
    assert "8 clip(s) dropped" in note


def test_mask_keeps_every_clip_with_the_region_box(shard):
    st, out, (media, _) = _view(shard, "mask")
    assert media.num_rows == 12
    boxes = dict(zip(media["sample_id"].to_pylist(), media["overlay_bbox"].to_pylist()))
    assert all(boxes[f"webvid-{i}"] for i in range(8)) and not any(boxes[f"webvid-{i}"] for i in range(8, 12))


def test_remove_writes_a_full_media_shard_with_the_marked_clips_cleaned(shard):
    st, out, (media, _) = _view(shard, "remove")
    assert out["summary"]["removed"] == 8 and media.num_rows == 12
    tar = set(media["media_tar"].to_pylist())
    assert len(tar) == 1 and tar.pop().startswith("curated/webvid_watermark/shard-00000/")
    before = dict(iter_shard(st, "webvid", "shard-00000"))
    after = {}
    import tarfile

    with st.open(media["media_tar"][0].as_py(), "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            after.setdefault(key, {})[ext] = tf.extractfile(m).read()
    assert set(after) == set(before)
    flagged = {k for k, sid in zip(media["media_key"].to_pylist(), media["sample_id"].to_pylist()) if int(sid.split("-")[1]) < 8}
    for key in before:
        assert (after[key]["mp4"] != before[key]["mp4"]) == (key in flagged)
        assert after[key]["json"] == before[key]["json"]
    status = read_status(st, "webvid", "shard-00000")
    assert status.num_rows == 12


def test_bad_mode_is_a_clear_error(shard):
    with pytest.raises(ValueError, match="mode must be one of"):
        score_and_commit(Storage(str(shard)), "shard-00000", WatermarkConfig(), "blur", "alpha", _Log())
