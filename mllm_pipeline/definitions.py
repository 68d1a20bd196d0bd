"""The code location's single entry point (named by workspace.yaml and pyproject.toml)."""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.defs.ingest.assets import GROUP as INGEST_GROUP
from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.resources import default_storage

#: Every raw-annotation asset; with no run config this runs on the embedded demo corpus.
ingest_job = dg.define_asset_job("ingest_raw_annotations", selection=dg.AssetSelection.groups(INGEST_GROUP))

#: The main job: the whole pipeline on the embedded demo (later stages join it as they are built).
demo_job = dg.define_asset_job(
    "demo_pipeline",
    selection=dg.AssetSelection.all(),
    description="The whole pipeline; with no run config it runs on the embedded demo corpus.",
)

defs = dg.Definitions(
    assets=RAW_ASSETS,
    jobs=[demo_job, ingest_job],
    resources={"storage": default_storage()},
)
