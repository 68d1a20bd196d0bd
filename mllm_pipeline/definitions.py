"""The code location's single entry point (named by workspace.yaml and pyproject.toml)."""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.defs.ingest.assets import GROUP as INGEST_GROUP
from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS
from mllm_pipeline.defs.resources import default_storage

#: Every raw-annotation asset; with no run config this runs on the embedded demo corpus.
ingest_job = dg.define_asset_job("ingest_raw_annotations", selection=dg.AssetSelection.groups(INGEST_GROUP))

#: Every unpartitioned asset, on the embedded demo with no run config. The per-shard stages (media downloads) are
#: partitioned and run per shard range: ``python -m mllm_pipeline.demo.run`` drives both, as the README shows.
demo_job = dg.define_asset_job(
    "demo_pipeline",
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*MEDIA_ASSETS),
    description="The unpartitioned stages; with no run config it runs on the embedded demo corpus.",
)

defs = dg.Definitions(
    assets=[*RAW_ASSETS, *MEDIA_ASSETS],
    jobs=[demo_job, ingest_job],
    resources={"storage": default_storage()},
)
