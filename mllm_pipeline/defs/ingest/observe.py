"""The raw annotation files as observable source assets (``<dataset>_annotation_files``), one per raw asset.

Observing one (**Observe sources** on the ingest graph's source nodes, or the asset's **Observe** button) records a
data version that is the digest of its files' content fingerprints (:func:`mllm_pipeline.stages.raw.
file_fingerprints`: size and content hash, or the ETag on S3), so the UI marks the raw asset stale exactly when a
file's content changed, not when it was only touched. Which files: the ones ``$MLLM_WATCH_CONFIG`` names for that
raw asset, the same file the ``raw_annotation_files`` sensor reads, since an observation has no run config.
"""

import os
import warnings
from typing import Any

import dagster as dg

from mllm_pipeline.storage import identity_digest

GROUP = "annotation_files"
#: raw asset -> (its source asset, the raw output's prefix)
RAW_SOURCES = {
    "raw_cc3m": ("cc3m_annotation_files", "raw/cc3m"),
    "raw_cc3m_wds": ("cc3m_wds_annotation_files", "raw/cc3m_wds"),
    "raw_webvid": ("webvid_annotation_files", "raw/webvid"),
    "raw_msrvtt": ("msrvtt_annotation_files", "raw/msrvtt"),
    "raw_coco": ("coco_annotation_files", "raw/coco"),
    "raw_internvid": ("internvid_annotation_files", "raw/internvid"),
}


def _files(raw_asset: str) -> tuple[list[str], str]:
    """(the watched files of ``raw_asset``, where they were named); [] when nothing names them."""
    from mllm_pipeline.stages.watch import WATCH_CONFIG_ENV, list_watched_files, load_watch_config, watched_specs

    location = os.environ.get(WATCH_CONFIG_ENV)
    if not location:
        return [], f"${WATCH_CONFIG_ENV} is not set"
    config = load_watch_config(location).get(raw_asset)
    if config is None:
        return [], f"{location} does not name {raw_asset}"
    if raw_asset == "raw_cc3m_wds":
        from mllm_pipeline.sources.cc3m_wds import list_shards

        return list_shards(config["directory"]), location
    return sorted(list_watched_files(watched_specs(config))), location


def source_asset(raw_asset: str) -> dg.SourceAsset:
    name, prefix = RAW_SOURCES[raw_asset]

    with warnings.catch_warnings():  # observable_source_asset is marked beta
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _source_asset(raw_asset, name, prefix)


def _source_asset(raw_asset: str, name: str, prefix: str) -> dg.SourceAsset:
    @dg.observable_source_asset(
        name=name, group_name=GROUP, required_resource_keys={"storage"},
        description=f"The annotation files {raw_asset} reads (named in $MLLM_WATCH_CONFIG); its data version follows "
                    "their content.",
    )
    def _observe(context) -> dg.ObserveResult:
        from mllm_pipeline.stages.watch import WatchConfigError
        from mllm_pipeline.stages.raw import file_fingerprints

        try:
            files, where = _files(raw_asset)
        except WatchConfigError as e:
            raise dg.Failure(str(e)) from None
        if not files:
            return dg.ObserveResult(data_version=dg.DataVersion("unwatched"),
                                    metadata={"files": 0, "note": f"nothing to observe: {where}"})
        prints: list[dict[str, Any]] = file_fingerprints(context.resources.storage.get(), prefix, files, context.log)
        return dg.ObserveResult(
            data_version=dg.DataVersion(f"files-{identity_digest(prints)}"),
            metadata={"files": len(prints), "bytes": sum(p["size"] for p in prints), "watch_config": where,
                      "fingerprints": dg.MetadataValue.json(prints)},
        )

    return _observe


SOURCE_ASSETS = [source_asset(name) for name in RAW_SOURCES]
