"""Exports: the record and file layout each multimodal trainer reads (VideoChat2, InternLM-XComposer2 / 4KHD,
InternVL, LLaVA / Video-LLaVA), in :mod:`.formats`. Writing an export of a committed manifests version (and the
media files its records point at) is a stage: :mod:`mllm_pipeline.stages.exports`."""

from mllm_pipeline.exports.formats import FORMATS

__all__ = ["FORMATS"]
