"""The ``media_hashes`` asset: content and perceptual hashes of every stored image and clip, one committed table per
media shard (:mod:`mllm_pipeline.vision.media_hash`). Shards whose media did not change are not hashed again;
the others are hashed in parallel processes."""


import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.conditions import FOLLOW_UPSTREAM
from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS
from mllm_pipeline.defs.partitions import combined_version, rollup_key
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.stages.media_hashes import check_workers, hash_all
from mllm_pipeline.vision.media_hash import CODE_VERSION, HashConfig


class MediaHashConfig(dg.Config):
    video_frames: int = Field(default=3, description="Frames hashed per video (evenly spaced, first and last left out).")
    workers: int = Field(default=0, description="Processes hashing shards in parallel (0: one per CPU core).")


@dg.asset(
    group_name="curated", deps=[rollup_key(a.key.to_user_string()) for a in MEDIA_ASSETS], kinds={"parquet"}, code_version=CODE_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    description="An exact content hash and perceptual hashes (images: one; videos: a few frames) of every stored "
                "sample of every media shard; the de-duplication stage finds media copies with them.",
)
def media_hashes(context: dg.AssetExecutionContext, config: MediaHashConfig, storage: StorageResource) -> dg.MaterializeResult:
    st = storage.get()
    try:
        cfg = HashConfig(video_frames=config.video_frames)
        check_workers(config.workers)
    except ValueError as e:
        raise dg.Failure(str(e)) from None
    try:
        rows, hashed = hash_all(st, cfg, config.workers, context.log)
    except RuntimeError as e:
        raise dg.Failure(str(e)) from None

    return dg.MaterializeResult(metadata={
        "samples": sum(r["samples"] for r in rows), "undecodable": sum(r["undecodable"] for r in rows),
        "shards_hashed": hashed, "shards_up_to_date": len(rows) - hashed,
        "shards": dg.MetadataValue.md(markdown_table(rows, ["dataset", "shard", "samples", "undecodable", "seconds", "up_to_date"])
                                      if rows else "no media shards yet"),
    }, data_version=dg.DataVersion(combined_version([r["version"] for r in rows]) if rows else "empty"))
