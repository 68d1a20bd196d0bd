"""The code location's single entry point (named by workspace.yaml and pyproject.toml)."""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.defs.automation import JOBS as AUTOMATION_JOBS
from mllm_pipeline.defs.automation import SCHEDULES, SENSORS, TRAINING_RUN_TAGS
from mllm_pipeline.defs.checks import ACCOUNTING_CHECKS, OTHER_CHECKS
from mllm_pipeline.defs.curate.captions import CAPTION_ASSETS, captions_dedup
from mllm_pipeline.defs.curate.media_hashes import media_hashes
from mllm_pipeline.defs.curate.watermark import webvid_watermark
from mllm_pipeline.defs.exports import EXPORT_ASSETS
from mllm_pipeline.defs.ingest.assets import GROUP as INGEST_GROUP
from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.ingest.observe import SOURCE_ASSETS
from mllm_pipeline.defs.manifests import manifests
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS
from mllm_pipeline.defs.resources import default_storage
from mllm_pipeline.defs.retention import retention_job, retention_schedule, storage_retention
from mllm_pipeline.defs.train import train_mllm
from mllm_pipeline.demo.config import default_raw_run_config

#: Every raw-annotation asset; each needs its files in the run config (``paths``; ``directory`` for raw_cc3m_wds).
ingest_job = dg.define_asset_job("ingest_raw_annotations", selection=dg.AssetSelection.groups(INGEST_GROUP))

#: The first stage of the demo, as a user would run it: the raw annotations of every dataset, with the embedded demo
#: corpus's files as the default run config (generate it first: ``python -m mllm_pipeline.demo.serve`` or
#: ``scripts/demo.sh``). ``python -m mllm_pipeline.demo.run`` drives the whole demo through the CLI.
demo_job = dg.define_asset_job(
    "demo_pipeline",
    selection=dg.AssetSelection.groups(INGEST_GROUP),
    config=default_raw_run_config(),
    description="The raw-annotation stage on the embedded demo corpus (its paths are the default config).",
)

#: Declarative automation: the curated and manifest stages follow upstream changes once this sensor is started
#: (off by default); blocking checks that failed upstream hold them back.
follow_upstream = dg.AutomationConditionSensorDefinition(
    "follow_upstream_changes",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Materializes the stages whose automation condition says so (clean captions, the watermark stage, "
                "caption de-duplication, manifests) when their upstream changed. Off by default.",
)

#: Training on its own, with a maximum run time (enforced where the instance runs run monitoring).
train_job = dg.define_asset_job("train", selection=dg.AssetSelection.assets(train_mllm), tags=TRAINING_RUN_TAGS)

defs = dg.Definitions(
    assets=[*SOURCE_ASSETS, *RAW_ASSETS, *MEDIA_ASSETS, *CAPTION_ASSETS, media_hashes, captions_dedup, webvid_watermark, manifests,
            *EXPORT_ASSETS, train_mllm, storage_retention],
    asset_checks=[*ACCOUNTING_CHECKS.values(), *OTHER_CHECKS],
    jobs=[demo_job, ingest_job, train_job, retention_job, *AUTOMATION_JOBS],
    sensors=[*SENSORS, follow_upstream],
    schedules=[*SCHEDULES, retention_schedule],
    resources={"storage": default_storage()},
)
