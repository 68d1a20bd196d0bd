"""The demo's run config: the embedded corpus's files given to the raw assets, and loopback allowed for its media
server, explicitly, the way any user configures a local mirror. Nothing in the pipeline knows about the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm_pipeline.demo.paths import demo_dir, demo_media_base_url
from mllm_pipeline.storage import Storage

#: Which files of the corpus each raw asset reads (names from ``generate_demo_corpus``).
RAW_INPUTS: dict[str, list[str]] = {
    "raw_cc3m": ["cc3m_train", "cc3m_val"],
    "raw_webvid": ["webvid"],
    "raw_msrvtt": [],  # set below: the annotation folder
    "raw_coco": ["coco_train", "coco_val"],
    "raw_internvid": ["internvid"],
}
MEDIA_ASSETS = ("images_cc3m", "images_coco", "videos_webvid", "videos_msrvtt", "videos_internvid")
#: The corpus's paths relative to its directory (what ``generate_demo_corpus`` writes).
LAYOUT = {
    "cc3m_train": "cc3m/Train_GCC-training.tsv",
    "cc3m_val": "cc3m/Validation_GCC-1.1.0-Validation.tsv",
    "cc3m_wds_dir": "cc3m_wds",
    "webvid": "webvid/results_2M_val.csv",
    "msrvtt": "msrvtt/train_val_videodatainfo.json",
    "msrvtt_annotations": "msrvtt/annotations",
    "msrvtt_videos_dir": "msrvtt/videos/all",
    "coco_train": "coco/annotations/captions_train2017.json",
    "coco_val": "coco/annotations/captions_val2017.json",
    "internvid": "internvid/InternVid-10M-flt.jsonl",
}


def demo_paths(directory: str | Path) -> dict[str, str]:
    return {k: str(Path(directory) / rel) for k, rel in LAYOUT.items()}


def raw_run_config(directory: str | Path, base_url: str | None = None) -> dict[str, Any]:
    """``ops:`` config of every raw asset, reading the demo corpus in ``directory``."""
    p = demo_paths(directory)
    base_url = (base_url or demo_media_base_url()).rstrip("/")
    ops: dict[str, Any] = {name: {"config": {"paths": [p[k] for k in keys]}} for name, keys in RAW_INPUTS.items()}
    # MSR-VTT as MMAction2's guide prepares it: the whole annotation folder, the 9k-1kA scheme
    ops["raw_msrvtt"]["config"].update({"paths": [p["msrvtt_annotations"] + "/*.json"], "split_scheme": "9k-1kA",
                                        "videos_dir": p["msrvtt_videos_dir"]})
    ops["raw_internvid"]["config"]["url_template"] = base_url + "/youtube/{id}.mp4"
    ops["raw_cc3m_wds"] = {"config": {"directory": p["cc3m_wds_dir"]}}
    return {"ops": ops}


def media_run_config(assets: list[str] | tuple[str, ...] = MEDIA_ASSETS) -> dict[str, Any]:
    """``ops:`` config of the media assets: loopback allowed (the demo's media server is on 127.0.0.1)."""
    return {"ops": {a: {"config": {"allow_loopback": True}} for a in assets}}


def default_raw_run_config() -> dict[str, Any]:
    """The raw config for the demo corpus under the configured storage root (nothing is generated here)."""
    return raw_run_config(demo_dir(Storage()))
