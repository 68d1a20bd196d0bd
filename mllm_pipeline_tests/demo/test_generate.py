"""The demo corpus: deterministic, idempotent, safe in parallel, and its media are real media."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import pytest
from PIL import Image

from mllm_pipeline.demo.generate import generate_demo_corpus

ANNOTATIONS = ["cc3m_train", "cc3m_val", "webvid", "msrvtt", "msrvtt_flat", "coco_train", "coco_val", "internvid"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    dest = tmp_path_factory.mktemp("demo") / "demo"
    return dest, generate_demo_corpus(dest, base_url="http://127.0.0.1:9999")


def test_deterministic(corpus, tmp_path):
    _, first = corpus
    second = generate_demo_corpus(tmp_path / "again", base_url="http://127.0.0.1:9999")
    for key in ANNOTATIONS:
        assert first[key].read_bytes() == second[key].read_bytes(), key


def test_idempotent(corpus):
    dest, paths = corpus
    before = paths["webvid"].stat().st_mtime_ns
    assert generate_demo_corpus(dest, base_url="http://127.0.0.1:9999") == paths
    assert paths["webvid"].stat().st_mtime_ns == before


def _parallel(dest: str) -> str:
    return str(generate_demo_corpus(dest)["webvid"])


def test_parallel_callers_get_one_corpus(tmp_path):
    with ProcessPoolExecutor(3) as pool:
        results = list(pool.map(_parallel, [str(tmp_path / "demo")] * 3))
    assert len(set(results)) == 1 and Path(results[0]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "demo.lock"]


def test_urls_point_at_generated_media(corpus):
    dest, paths = corpus
    urls = [line.split(b"\t")[-1].decode(errors="replace") for line in paths["cc3m_train"].read_bytes().splitlines()]
    urls = [u for u in urls if u.startswith("http://127.0.0.1:9999/")]
    missing = [u for u in urls if not (dest / u.removeprefix("http://127.0.0.1:9999/")).is_file()]
    assert len(urls) >= 40 and sorted(missing) == ["http://127.0.0.1:9999/cc3m/images/000000017.jpg",  # the deliberate 404
                                                   "http://127.0.0.1:9999/cc3m/images/x.jpg"]  # on the non-UTF-8 line
    coco = json.loads(paths["coco_train"].read_text())
    for im in coco["images"]:
        with Image.open(dest / "coco" / "train2017" / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"])


def test_videos_decode(corpus):
    dest, paths = corpus
    videos = list(dest.glob("shutterstock/**/*.mp4")) + list(dest.glob("youtube/*.mp4")) + list(dest.glob("msrvtt/videos/all/*.mp4"))
    assert len(videos) == 22 + 6 + 12
    for v in videos[::7]:
        with av.open(str(v)) as c:
            frames = sum(1 for _ in c.decode(video=0))
            assert frames > 0 and c.duration > 0
