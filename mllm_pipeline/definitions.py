"""The code location's single entry point (named by workspace.yaml and pyproject.toml)."""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.defs.automation import JOBS as AUTOMATION_JOBS
from mllm_pipeline.defs.automation import SCHEDULES, SENSORS, TRAINING_RUN_TAGS
from mllm_pipeline.defs.curate.captions import CAPTION_ASSETS, captions_dedup
from mllm_pipeline.defs.curate.watermark import webvid_watermark
from mllm_pipeline.defs.ingest.assets import GROUP as INGEST_GROUP
from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.manifests import manifests
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS
from mllm_pipeline.defs.resources import default_storage
from mllm_pipeline.defs.train import train_mllm

#: Every raw-annotation asset; with no run config this runs on the embedded demo corpus.
ingest_job = dg.define_asset_job("ingest_raw_annotations", selection=dg.AssetSelection.groups(INGEST_GROUP))

#: The first stage of the demo: the raw annotations of every dataset (the embedded demo corpus with no run config).
#: The per-shard stages (media, clean captions, the watermark stage) run per shard range, then the cross-shard
#: ones (caption de-duplication, manifests, training): ``python -m mllm_pipeline.demo.run`` drives all of it.
demo_job = dg.define_asset_job(
    "demo_pipeline",
    selection=dg.AssetSelection.groups(INGEST_GROUP),
    description="The raw-annotation stage; with no run config it runs on the embedded demo corpus.",
)

#: Training on its own, with a maximum run time (enforced where the instance runs run monitoring).
train_job = dg.define_asset_job("train", selection=dg.AssetSelection.assets(train_mllm), tags=TRAINING_RUN_TAGS)

defs = dg.Definitions(
    assets=[*RAW_ASSETS, *MEDIA_ASSETS, *CAPTION_ASSETS, captions_dedup, webvid_watermark, manifests, train_mllm],
    jobs=[demo_job, ingest_job, train_job, *AUTOMATION_JOBS],
    sensors=SENSORS,
    schedules=SCHEDULES,
    resources={"storage": default_storage()},
)
