"""Export assets: the committed manifests -> the files VideoChat2, InternLM-XComposer2, InternVL and LLaVA /
Video-LLaVA read (see :mod:`mllm_pipeline.exports`).

* ``export_media``: the media files the exports point at, extracted once per committed media shard version
  (``exports/media/...``) and shared by every export;
* ``export_videochat2``, ``export_ixc2``, ``export_internvl``, ``export_llava``: one committed version per
  manifests version and config (``exports/<format>/<version>/``), each naming the manifests version it came from.
"""


from typing import Any, Optional

import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.conditions import FOLLOW_UPSTREAM
from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.defs.tables import table
from mllm_pipeline.exports import FORMATS
from mllm_pipeline.exports.formats import DEFAULT_QA_INSTRUCTIONS
from mllm_pipeline.stages.exports import (
    EXPORT_CODE_VERSION,
    MEDIA_CODE_VERSION,
    MEDIA_FILES_ROOT,
    SPLITS,
    ExportConfig,
    build_export,
    extract_manifests_media,
)

GROUP = "exports"


class ExportMediaConfig(dg.Config):
    manifests_version: Optional[str] = Field(default=None, description="Extract the media of this committed manifests version (default: the current one).")


@dg.asset(
    group_name=GROUP, deps=["manifests"], kinds={"webdataset"}, code_version=MEDIA_CODE_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    description="The media files the exports point at (none of the consumers reads tars): each media shard the "
                "manifests read, extracted once per media shard version into exports/media/ and shared by every "
                "export and manifests version.",
)
def export_media(context: dg.AssetExecutionContext, config: ExportMediaConfig, storage: StorageResource) -> dg.MaterializeResult:
    st = storage.get()
    try:
        man, rows = extract_manifests_media(st, config.manifests_version, context.log)
    except FileNotFoundError as e:
        raise dg.Failure(str(e)) from None
    return dg.MaterializeResult(metadata={
        "dagster/row_count": sum(r["files"] for r in rows),
        "media_shards": len(rows), "extracted_now": sum(r["extracted_now"] for r in rows),
        "shards": table(rows, ["shard", "version", "files", "MB", "extracted_now"]),
        "media_root": st.uri(MEDIA_FILES_ROOT), "manifests_version": man["version"],
    }, data_version=dg.DataVersion(f"{man['version']}/{MEDIA_CODE_VERSION}"))


class ExportAssetConfig(dg.Config):
    media: str = Field(default="shared", description="shared: the records point at export_media's files (extracted "
                       "once, no copy per export); copy: the files are copied into this export (self-contained).")
    media_root: str = Field(default="", description="Where the consumer's machine sees the media root (a mount of the "
                            "storage root, say). Empty: its location on the storage root. An export copied elsewhere "
                            "is pointed at its new place with `python <export>/locate.py --media-root DIR` instead.")
    export_root: str = Field(default="", description="Where the consumer's machine sees this export's directory. "
                             "Empty: its location on the storage root.")
    splits: list[str] = Field(default=list(SPLITS), description="Manifest splits to export.")
    manifests_version: Optional[str] = Field(default=None, description="Export this committed manifests version (default: the current one).")
    qa_image_instruction: str = Field(default=DEFAULT_QA_INSTRUCTIONS["image"], description="VideoChat2: the instruction ('i') of image question turns.")
    qa_video_instruction: str = Field(default=DEFAULT_QA_INSTRUCTIONS["video"], description="VideoChat2: the instruction ('i') of video question turns.")
    video_frames: int = Field(default=8, description="InternVL (and IXC-2.5 with ixc2_video: composite): frames "
                              "sampled per video, evenly from first to last, written once per media shard as JPEGs.")
    internvl_max_dynamic_patch: int = Field(default=6, description="InternVL: the --max_dynamic_patch the trainer "
                                            "runs with (its InternVL2.5 finetune scripts: 6); bounds the image tokens.")
    internvl_max_seq_length: int = Field(default=8192, description="InternVL: the --max_seq_length the trainer runs "
                                         "with; a record that could exceed it (image tokens + text) is skipped and counted.")
    ixc2_video: str = Field(default="skip", description="InternLM-XComposer: skip (the 2 / 4KHD finetune reads no "
                            "video) or composite (each video as one picture of its frames, the form IXC-2.5 reads).")

    def export_config(self) -> ExportConfig:
        return ExportConfig(media=self.media, media_root=self.media_root, export_root=self.export_root,
                            splits=tuple(self.splits), qa_image_instruction=self.qa_image_instruction,
                            qa_video_instruction=self.qa_video_instruction, video_frames=self.video_frames,
                            internvl_max_dynamic_patch=self.internvl_max_dynamic_patch,
                            internvl_max_seq_length=self.internvl_max_seq_length, ixc2_video=self.ixc2_video)


def export_asset(fmt: str) -> dg.AssetsDefinition:
    consumer = FORMATS[fmt].consumer

    @dg.asset(
        name=f"export_{fmt}", group_name=GROUP, deps=["manifests", export_media.key], kinds={"json"},
        code_version=EXPORT_CODE_VERSION, automation_condition=FOLLOW_UPSTREAM,
        description=f"The manifests as {consumer} reads them, one committed version per manifests version and config "
                    f"(exports/{fmt}/); it names the manifests version it came from, gives the trainer's flags "
                    "(usage) and carries locate.py, which points a copy of the export at its new place.",
    )
    def _asset(context: dg.AssetExecutionContext, config: ExportAssetConfig, storage: StorageResource) -> dg.MaterializeResult:
        st = storage.get()
        try:
            committed, up_to_date = build_export(st, fmt, _export_config(config), context.log, config.manifests_version)
        except (ValueError, FileNotFoundError) as e:
            raise dg.Failure(str(e)) from None
        return dg.MaterializeResult(metadata=export_metadata(committed, up_to_date),
                                    data_version=dg.DataVersion(committed["version"]))

    return _asset


def _export_config(config: ExportAssetConfig) -> ExportConfig:
    try:
        return config.export_config()
    except ValueError as e:
        raise dg.Failure(f"export config: {e}") from None


def export_metadata(committed: dict[str, Any], up_to_date: bool) -> dict[str, Any]:
    s = committed["summary"]
    return {
        "dagster/row_count": sum(r["records"] for r in s["records"]),
        "records": table(s["records"], ["split", "dataset", "records"]),
        "skipped": table(s["skipped"], ["split", "dataset", "media_kind", "rows", "why"]),
        "left_out": table(s.get("left_out", []), ["note", "rows"]),
        "examples": dg.MetadataValue.md(markdown_table(s["examples"], ["split", "dataset", "id", "media", "text"])),
        "usage": dg.MetadataValue.md(f"```\n{s['usage']}\n```"),
        "files": table([{"file": f, "records": n} for f, n in s["files"].items()], ["file", "records"],
                       {"records": "records in the file (empty: a file written from the counts, e.g. data.txt)"}),
        "media": s["media"], "media_root": s["media_root"], "export_root": s["export_root"],
        "video_pictures": s.get("video_pictures") or "none",
        "relocate": f"python {s['export_root']}/locate.py --media-root <where the media are>",
        "manifests_version": s["manifests_version"],
        "location": committed["location"], "version": committed["version"], "up_to_date": up_to_date,
        "upstream_versions": dg.MetadataValue.md(markdown_table(committed["inputs"], ["prefix", "version"])),
    }


EXPORT_ASSETS = [export_media, *(export_asset(fmt) for fmt in FORMATS)]
