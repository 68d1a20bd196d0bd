"""Exports: one committed manifest version -> the files each multimodal trainer reads.

* :mod:`.formats` — the record and file layout of each consumer (VideoChat2, InternLM-XComposer2 / 4KHD,
  InternVL, LLaVA / Video-LLaVA);
* :mod:`.media` — the media files those records point at, extracted from the committed webdataset shards once per
  media shard version and shared by every export (or copied into one export);
* :mod:`.build` — reads a manifests version, writes one export into a committed version, and names the manifests
  version (and the media versions) it read.
"""

from mllm_pipeline.exports.build import EXPORT_CODE_VERSION, ExportConfig, build_export, export_prefix
from mllm_pipeline.exports.formats import FORMATS
from mllm_pipeline.exports.media import ensure_media_files

__all__ = ["EXPORT_CODE_VERSION", "FORMATS", "ExportConfig", "build_export", "ensure_media_files", "export_prefix"]
