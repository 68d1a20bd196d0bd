"""The clean-captions stage: one committed output per raw shard.

``captions/<dataset>/<shard>/<version>/{kept,rejected}.parquet`` — :func:`clean_and_commit`, one raw shard. The
cross-shard (and cross-modal) de-duplication that reads these is its own stage, :mod:`mllm_pipeline.stages.dedup`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

from mllm_pipeline.sources.common import RawShard
from mllm_pipeline.storage import Storage, read_parquet
from mllm_pipeline.text.clean import ShardCleanResult, clean_shard
from mllm_pipeline.text.config import CleanConfig

#: Bump when a cleaning or de-duplication rule changes what comes out for the same captions and config.
CODE_VERSION = "captions-3"


def captions_prefix(dataset: str, shard_key: str) -> str:
    return f"captions/{dataset}/{shard_key}"


def read_kept(storage: Storage, dataset: str, shard_key: str, columns: list[str] | None = None) -> pa.Table:
    prefix = captions_prefix(dataset, shard_key)
    return storage.read_parquet(f"{prefix}/{storage.read_manifest(prefix)['version']}/kept.parquet", columns)


def config_identity(config: CleanConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items()}


def clean_and_commit(storage: Storage, dataset: str, shard_key: str, raw: RawShard, config: CleanConfig,
                     log: Any = None) -> tuple[ShardCleanResult, bool]:
    """Clean one raw shard's captions and commit its kept and rejected tables; ``(result, up_to_date)``.

    The output is named by the shard's captions (their digest), the config and :data:`CODE_VERSION`: when that is
    already committed, it is read back instead of cleaned again."""
    prefix = captions_prefix(dataset, shard_key)
    identity = {"stage": "captions", "code": CODE_VERSION, "dataset": dataset, "rows": raw.digest("captions"),
                "config": config_identity(config)}
    done = storage.up_to_date(prefix, identity)
    if done is not None:
        if log is not None:
            log.info(f"[{dataset} {shard_key}] up to date: {done['version']} was cleaned from these captions with this config")
        base = f"{prefix}/{done['version']}"
        return ShardCleanResult(dataset, storage.read_parquet(f"{base}/kept.parquet"),
                                storage.read_parquet(f"{base}/rejected.parquet"), done["counts"], done["examples"]), True
    result = clean_shard(read_parquet(raw.uri, columns=["sample_id", "captions", "split"]), dataset, config)
    with storage.new_version(prefix, identity, inputs=[raw.ref()]) as version:
        storage.write_parquet(version.rel("kept.parquet"), result.kept)
        storage.write_parquet(version.rel("rejected.parquet"), result.rejected)
        version.commit({"dataset": dataset, "kind": "clean_captions", "shard": shard_key, "raw_version": raw.raw_version,
                        "rows_digest": raw.digest("captions"), "counts": result.counts, "examples": result.examples,
                        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "lid_model_path"}})
    return result, False
