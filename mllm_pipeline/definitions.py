"""The code location's single entry point (named by workspace.yaml and pyproject.toml): it only composes.

Assets live in ``defs/<stage>``, checks in ``defs/checks.py``, jobs in ``defs/jobs.py``, schedules in
``defs/schedules.py``, sensors in ``defs/sensors.py``, the storage and tracking resources in
``defs/resources.py``.
"""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.defs.checks import ACCOUNTING_CHECKS, OTHER_CHECKS
from mllm_pipeline.defs.curate.captions import CAPTION_ASSETS, CAPTION_ROLLUPS, captions_dedup
from mllm_pipeline.defs.curate.media_hashes import media_hashes
from mllm_pipeline.defs.curate.watermark import WATERMARK_ROLLUP, webvid_watermark
from mllm_pipeline.defs.exports import EXPORT_ASSETS
from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.ingest.observe import SOURCE_ASSETS
from mllm_pipeline.defs.jobs import JOBS
from mllm_pipeline.defs.manifests import manifests
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS, MEDIA_ROLLUPS
from mllm_pipeline.defs.resources import default_storage, default_tracking
from mllm_pipeline.defs.retention import storage_retention
from mllm_pipeline.defs.schedules import SCHEDULES
from mllm_pipeline.defs.sensors import SENSORS
from mllm_pipeline.defs.train import train_mllm

defs = dg.Definitions(
    assets=[*SOURCE_ASSETS, *RAW_ASSETS, *MEDIA_ASSETS, *MEDIA_ROLLUPS, *CAPTION_ASSETS, *CAPTION_ROLLUPS, WATERMARK_ROLLUP,
            media_hashes, captions_dedup, webvid_watermark, manifests,
            *EXPORT_ASSETS, train_mllm, storage_retention],
    asset_checks=[*ACCOUNTING_CHECKS.values(), *OTHER_CHECKS],
    jobs=JOBS,
    sensors=SENSORS,
    schedules=SCHEDULES,
    resources={"storage": default_storage(), "tracking": default_tracking()},
)
