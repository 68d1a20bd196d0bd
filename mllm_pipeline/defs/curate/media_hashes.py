"""The ``media_hashes`` asset: content and perceptual hashes of every stored image and clip, one committed table per
media shard (:mod:`mllm_pipeline.vision.media_hash`). Shards whose media did not change are not hashed again;
the others are hashed in parallel processes."""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.conditions import FOLLOW_UPSTREAM
from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.media.assets import MEDIA_ASSETS
from mllm_pipeline.defs.partitions import combined_version
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.stages.media import media_prefix
from mllm_pipeline.stages.registry import DATASET_NAMES
from mllm_pipeline.stages.media import committed_shards
from mllm_pipeline.stages.media_hashes import hash_identity, hash_shard_at, hashes_prefix
from mllm_pipeline.vision.media_hash import CODE_VERSION, HashConfig


class MediaHashConfig(dg.Config):
    video_frames: int = Field(default=3, description="Frames hashed per video (evenly spaced, first and last left out).")
    workers: int = Field(default=0, description="Processes hashing shards in parallel (0: one per CPU core).")


@dg.asset(
    group_name="curated", deps=[a.key for a in MEDIA_ASSETS], kinds={"parquet"}, code_version=CODE_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    description="An exact content hash and perceptual hashes (images: one; videos: a few frames) of every stored "
                "sample of every media shard; the de-duplication stage finds media copies with them.",
)
def media_hashes(context: dg.AssetExecutionContext, config: MediaHashConfig, storage: StorageResource) -> dg.MaterializeResult:
    st = storage.get()
    try:
        cfg = HashConfig(video_frames=config.video_frames)
    except ValueError as e:
        raise dg.Failure(str(e)) from None
    todo, rows = [], []
    for ds in DATASET_NAMES:
        for key in committed_shards(st, ds, "media"):
            media = st.current(media_prefix(ds, key))
            done = st.up_to_date(hashes_prefix(ds, key), hash_identity(media["version"], cfg))
            if done is not None:
                rows.append({"dataset": ds, "shard": key, "samples": done.get("samples", 0),
                             "undecodable": done.get("undecodable", 0), "seconds": 0.0, "version": done["version"],
                             "up_to_date": True})
                continue
            todo.append((ds, key))
    context.log.info(f"{len(rows)} media shard(s) up to date, {len(todo)} to hash")
    workers = config.workers or (os.cpu_count() or 1)
    if todo:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(hash_shard_at, st.root, ds, key, cfg): (ds, key) for ds, key in todo}
            for n, fut in enumerate(as_completed(futures), 1):
                ds, key = futures[fut]
                try:
                    r = fut.result()
                except Exception as e:  # noqa: BLE001 - name the shard, keep the traceback's message
                    raise dg.Failure(f"hashing {ds} {key} failed: {type(e).__name__}: {e}") from e
                rows.append(r)
                context.log.info(f"[{n}/{len(todo)}] {ds} {key}: {r['samples']:,} sample(s) in {r['seconds']:.1f}s"
                                 + (f", {r['undecodable']} undecodable" if r["undecodable"] else ""))
    rows.sort(key=lambda r: (DATASET_NAMES.index(r["dataset"]), r["shard"]))

    return dg.MaterializeResult(metadata={
        "samples": sum(r["samples"] for r in rows), "undecodable": sum(r["undecodable"] for r in rows),
        "shards_hashed": len(todo), "shards_up_to_date": len(rows) - len(todo),
        "shards": dg.MetadataValue.md(markdown_table(rows, ["dataset", "shard", "samples", "undecodable", "seconds", "up_to_date"])
                                      if rows else "no media shards yet"),
    }, data_version=dg.DataVersion(combined_version([r["version"] for r in rows]) if rows else "empty"))
