"""The datasets the pipeline knows: one entry each, read by every stage and by the Dagster layer.

A dataset's name is its folder under every stage's output (``raw/<name>``, ``media/<name>/<shard>``,
``captions/<name>/<shard>``, ...), and names its assets (``raw_<name>``, ``images_<name>`` or ``videos_<name>``,
``captions_<name>``). ``cc3m_wds`` is CC3M adopted from pre-downloaded webdataset tars: its own dataset downstream.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    media_kind: str  # "image" or "video"
    #: how the raw accounting check counts records in a source file: one line each ("tsv", "csv", "jsonl"), or by
    #: the structure of a JSON document / tar ("coco", "msrvtt", "cc3m_wds")
    record_format: str

    @property
    def raw_asset(self) -> str:
        return f"raw_{self.name}"

    @property
    def raw_prefix(self) -> str:
        return f"raw/{self.name}"

    @property
    def media_asset(self) -> str:
        return f"{'videos' if self.media_kind == 'video' else 'images'}_{self.name}"

    @property
    def captions_asset(self) -> str:
        return f"captions_{self.name}"

    @property
    def video(self) -> bool:
        return self.media_kind == "video"


#: In the order every stage processes them (the order of the de-duplication: earlier datasets keep their samples).
DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("cc3m", "image", "tsv"),
    Dataset("coco", "image", "coco"),
    Dataset("webvid", "video", "csv"),
    Dataset("msrvtt", "video", "msrvtt"),
    Dataset("internvid", "video", "jsonl"),
    Dataset("cc3m_wds", "image", "cc3m_wds"),
)}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}: one of {', '.join(DATASET_NAMES)}") from None
