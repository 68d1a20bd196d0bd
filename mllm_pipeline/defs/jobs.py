"""Every job of the code location.

* ``ingest_raw_annotations``: the raw-annotation assets its run config gives files to (the others are skipped).
* ``demo_pipeline``: the same, with the embedded demo corpus's files as the default run config (generate it first:
  ``python -m mllm_pipeline.demo.serve`` or ``scripts/demo.sh``); ``python -m mllm_pipeline.demo.run`` drives the
  whole demo through the CLI.
* ``download_<media asset>``: one media asset's shards (one run per partition range); every run carries
  ``dagster/max_runtime`` (``$MLLM_DOWNLOAD_MAX_RUNTIME_S``, default 6 h), which run monitoring enforces
  (``run_monitoring: {enabled: true}`` in the instance's ``dagster.yaml``; ``docker/dagster.yaml`` has it).
* ``train``: training on its own, tagged :data:`TRAINING_RUN_TAGS` (3 days); the asset uses the pool ``gpu``.
* ``storage_retention_job``: the retention rule.

Pools (``downloads``, ``gpu``) get their limits from the instance: ``docker/dagster.yaml`` sets
``concurrency.pools.default_limit: 1`` (so ``gpu`` is one run at a time without further set-up) and the compose
daemon sets ``downloads`` explicitly with ``dagster instance concurrency set``.
"""

from __future__ import annotations

import os

import dagster as dg

from mllm_pipeline.defs.ingest.assets import GROUP as INGEST_GROUP
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS
from mllm_pipeline.defs.retention import storage_retention
from mllm_pipeline.defs.train import train_mllm
from mllm_pipeline.demo.config import default_raw_run_config

#: The pool every GPU step (training) should use; with the instance's pool limit of 1, one such step per GPU.
GPU_POOL = "gpu"
#: The pool of the media downloads (set on the media assets).
DOWNLOADS_POOL = "downloads"
#: Tags for training jobs: run monitoring terminates a training run after 3 days.
TRAINING_RUN_TAGS = {"dagster/max_runtime": str(3 * 24 * 3600)}


def _download_max_runtime_s() -> int:
    raw = os.environ.get("MLLM_DOWNLOAD_MAX_RUNTIME_S", str(6 * 3600))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"MLLM_DOWNLOAD_MAX_RUNTIME_S must be a whole number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"MLLM_DOWNLOAD_MAX_RUNTIME_S must be positive, got {value}")
    return value


def download_job(asset: dg.AssetsDefinition) -> dg.UnresolvedAssetJobDefinition:
    name = asset.key.to_user_string()
    return dg.define_asset_job(
        f"download_{name}",
        selection=[asset],
        tags={"dagster/max_runtime": str(_download_max_runtime_s())},
        description=f"Fetch shards of {name} (one run per partition range); run monitoring ends a run after "
        "dagster/max_runtime seconds.",
    )


DOWNLOAD_JOBS = {a.key.to_user_string(): download_job(a) for a in MEDIA_ASSETS}

ingest_job = dg.define_asset_job("ingest_raw_annotations", selection=dg.AssetSelection.groups(INGEST_GROUP))

demo_job = dg.define_asset_job(
    "demo_pipeline",
    selection=dg.AssetSelection.groups(INGEST_GROUP),
    config=default_raw_run_config(),
    description="The raw-annotation stage on the embedded demo corpus (its paths are the default config).",
)

train_job = dg.define_asset_job("train", selection=dg.AssetSelection.assets(train_mllm), tags=TRAINING_RUN_TAGS)

retention_job = dg.define_asset_job("storage_retention_job", selection=[storage_retention])

JOBS = [demo_job, ingest_job, train_job, retention_job, *DOWNLOAD_JOBS.values()]
