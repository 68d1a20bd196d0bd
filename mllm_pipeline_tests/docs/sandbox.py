"""A machine as the docs describe it, on tiny files: the documented locations (``/datasets/...``, ``/models/...``,
``s3://my-bucket/...``) hold files in each dataset's official layout, the media they point at are served on
loopback, and the commands run with their own Dagster home and storage root.

The files come from the embedded demo corpus (every official layout, with real faults), plus the layouts the demo
does not carry: the MSR-VTT retrieval bundle (CLIP4Clip's files), Karpathy's ``dataset_coco.json``, WebVid videos
and a video2dataset output on disk, InternVid clips already cut. The LLM's tokenizer at ``/models/...`` is a small
BPE trained on the corpus's captions on the spot. The docs' absolute locations are mapped into the sandbox by
prefix (:meth:`Sandbox.localize`); nothing else in a command or config is changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_DIRS = ("vicuna-7b-v1.5",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(dest: Path, target: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(target)


class Sandbox:
    def __init__(self, base: Path, s3_endpoint: str, media_url: str):
        self.base, self.s3_endpoint, self.media_url = base, s3_endpoint, media_url
        self.work = base / "work"
        self.root = base / "root"

    def localize(self, text: str) -> str:
        """The docs' absolute locations, inside the sandbox."""
        for prefix in ("/datasets/", "/models/"):
            text = text.replace(" " + prefix, f" {self.base}{prefix}").replace("[" + prefix, f"[{self.base}{prefix}")
        return text

    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "DAGSTER_HOME": str(self.base / "home"),
                "MLLM_STORAGE_ROOT": str(self.root), "MLLM_ALLOW_LOOPBACK": "1", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "MLLM_S3_ENDPOINT_URL": self.s3_endpoint, "PYTHONUNBUFFERED": "1"}

    def run(self, command: str, timeout: int = 900, fails_with: str | None = None) -> subprocess.CompletedProcess:
        """One documented command, as a user types it in the project folder (``source scripts/setup.sh`` is what
        made this environment, so it is not run again). ``fails_with``: the page shows it failing with that text."""
        if command.startswith("source scripts/setup.sh"):
            return subprocess.CompletedProcess(command, 0, "", "")
        proc = subprocess.run(["bash", "-c", self.localize(command)], cwd=self.work, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if fails_with is not None:
            assert proc.returncode != 0 and fails_with in proc.stdout + proc.stderr, \
                f"$ {command}: expected a failure saying {fails_with!r}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        else:
            assert proc.returncode == 0, f"$ {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc


def _bundle_and_extras(ds: Path, corpus: dict[str, Path]) -> None:
    """The layouts raw.md documents beyond the README's: MSR-VTT's bundle, Karpathy's split, media on disk."""
    from mllm_pipeline_tests.defs.test_local_videos import write_video2dataset_shard
    from mllm_pipeline_tests.sources.msrvtt_bundle import write_bundle

    files = write_bundle(ds.parent / "bundle_files")
    for key, path in files.items():
        dest = ds / "msrvtt" / ("msrvtt_qa" if key.startswith("qa_") else "") / path.name
        _link(dest, path)
    _link(ds / "msrvtt/videos_2fps_224", corpus["msrvtt_videos_dir"])
    # the bundle names more videos than the demo holds: every one of them on disk, as a downloaded release has
    videos = corpus["msrvtt_videos_dir"]
    some = sorted(videos.glob("*.mp4"))[0]
    for v in json.loads(files["data"].read_text())["videos"]:
        if not (videos / f"{v['video_id']}.mp4").exists():
            shutil.copy(some, videos / f"{v['video_id']}.mp4")
    # Karpathy's dataset_coco.json over the corpus's COCO images: its val images are Karpathy's test split
    val = json.loads(corpus["coco_val"].read_text())["images"]
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "sentids": [n], "imgid": n, "split": "test", "cocoid": im["id"],
         "filename": f"COCO_val2014_{im['id']:012d}.jpg",
         "sentences": [{"tokens": ["a", "picture"], "raw": "A picture.", "imgid": n, "sentid": n}]}
        for n, im in enumerate(val)]}
    (ds / "coco/karpathy").mkdir(parents=True)
    (ds / "coco/karpathy/dataset_coco.json").write_text(json.dumps(karpathy))
    # WebVid: the CSV, a folder of <videoid>.mp4 and a video2dataset output, as a team that fetched some of it holds
    import csv

    csv_path = ds / "webvid/results_10M_train.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(corpus["webvid"], csv_path)
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    corpus_dir = corpus["cc3m_train"].parent.parent
    videos = []
    for r in rows:
        parts = (r.get("contentUrl") or "").split("/", 3)
        local = corpus_dir / parts[3] if len(parts) == 4 and parts[0].startswith("http") else None
        if local is not None and local.is_file() and r.get("videoid", "").isdigit():
            videos.append((r, local.read_bytes()))
    (ds / "webvid/videos").mkdir(parents=True)
    for r, data in videos[:3]:
        (ds / "webvid/videos" / f"{r['videoid']}.mp4").write_bytes(data)
    write_video2dataset_shard(ds / "webvid/v2d", 0, [(i, r, data) for i, (r, data) in enumerate(videos[3:6])])
    # InternVid: clips already cut, named {youtube_id}_{start}_{end}.mp4
    (ds / "internvid/clips").mkdir(parents=True)
    for line in corpus["internvid"].read_text().splitlines()[:4]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        src = corpus_dir / "youtube" / f"{row['YoutubeID']}.mp4"
        if src.is_file():
            shutil.copy(src, ds / "internvid/clips" / f"{row['YoutubeID']}_{row['Start_timestamp']}_{row['End_timestamp']}.mp4")


@contextlib.contextmanager
def sandbox(base: Path, s3_endpoint: str) -> Iterator[Sandbox]:
    """Build the documented machine under ``base`` and serve its media for the duration."""
    import boto3

    from mllm_pipeline.demo.generate import generate_demo_corpus
    from mllm_pipeline.demo.media_host import serve_static
    from mllm_pipeline.demo.tokenizer import train_tokenizer

    port = _free_port()
    corpus = generate_demo_corpus(base / "corpus", base_url=f"http://127.0.0.1:{port}")
    ds = base / "datasets"
    _link(ds / "cc3m/Train_GCC-training.tsv", corpus["cc3m_train"])
    _link(ds / "cc3m/Validation_GCC-1.1.0-Validation.tsv", corpus["cc3m_val"])
    _link(ds / "msrvtt/annotations", corpus["msrvtt_annotations"])
    _link(ds / "msrvtt/videos/all", corpus["msrvtt_videos_dir"])
    _link(ds / "coco/annotations", corpus["coco_train"].parent)
    for split in ("train2017", "val2017"):
        _link(ds / "coco" / split, corpus["coco_train"].parent.parent / split)
    _link(ds / "internvid/InternVid-10M-flt.jsonl", corpus["internvid"])
    _link(ds / "cc3m-wds", corpus["cc3m_wds_dir"])
    _bundle_and_extras(ds, corpus)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    if "my-bucket" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket="my-bucket")
    s3.upload_file(str(corpus["webvid"]), "my-bucket", "webvid/results_10M_train.csv")
    captions = [json.loads(line).get("Caption", "") for line in corpus["internvid"].read_text().splitlines()
                if line.startswith("{") and line.endswith("}")]
    captions += [line.split("\t")[0] for line in corpus["cc3m_train"].read_text(errors="replace").splitlines()]
    for name in MODEL_DIRS:
        train_tokenizer([c for c in captions if c] * 4, base / "models" / name, vocab_size=1024)
    for d in ("work", "home", "root"):
        (base / d).mkdir(exist_ok=True)
    shutil.copy(REPO / "workspace.yaml", base / "work" / "workspace.yaml")  # the project folder's workspace file
    with serve_static(base / "corpus", port=port) as url:
        yield Sandbox(base, s3_endpoint, url)
