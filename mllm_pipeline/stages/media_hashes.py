"""The media-hashes stage: one committed hash table per media shard.

``curated/media_hashes/<dataset>/<shard>/<version>/hashes.parquet`` — :func:`hash_and_commit`, named by the media
shard version it hashed, the hash config and the hashing code version: a shard whose media did not change is not
hashed again. The hashes themselves are :mod:`mllm_pipeline.vision.media_hash`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.stages.gate import pipeline_storage
from mllm_pipeline.stages.media import committed_shards, iter_shard, media_index, media_prefix
from mllm_pipeline.stages.registry import DATASET_NAMES
from mllm_pipeline.storage import Storage
from mllm_pipeline.vision.media_hash import CODE_VERSION, HashConfig, hash_members, hash_table

HASHES = "hashes.parquet"


def hashes_prefix(dataset: str, shard_key: str) -> str:
    return f"curated/media_hashes/{dataset}/{shard_key}"


def hash_identity(media_version: str, config: HashConfig) -> dict[str, Any]:
    """What a committed hash table is made from: the media version, the config and :data:`CODE_VERSION`."""
    return {"stage": "media_hashes", "code": CODE_VERSION, "media": media_version, "config": dataclasses.asdict(config)}


def hash_and_commit(storage: Storage, dataset: str, shard_key: str, config: HashConfig = HashConfig(),
                    log: Any = None) -> dict[str, Any]:
    """Hash every stored sample of the current version of one media shard and commit the table
    (``curated/media_hashes/<dataset>/<shard>/<version>/hashes.parquet``). Named by the media version, the config
    and :data:`CODE_VERSION`: a shard whose media did not change is not hashed again. Returns the committed
    manifest plus ``up_to_date``."""
    media_manifest = storage.read_manifest(media_prefix(dataset, shard_key))
    prefix = hashes_prefix(dataset, shard_key)
    identity = hash_identity(media_manifest["version"], config)
    done = storage.up_to_date(prefix, identity)
    if done is not None:
        return {**done, "up_to_date": True}
    media = media_index(storage, dataset, shard_key, media_manifest)
    sample_of = dict(zip(media["media_key"].to_pylist(), media["sample_id"].to_pylist()))
    t0 = time.monotonic()
    table = hash_table(hash_members(iter_shard(storage, dataset, shard_key), sample_of, config))
    seconds = time.monotonic() - t0
    errors = int(pc.sum(pc.is_valid(table["error"]).cast(pa.int64())).as_py() or 0)
    ref = {"prefix": media_prefix(dataset, shard_key), "version": media_manifest["version"]}
    with storage.new_version(prefix, identity, inputs=[ref]) as version:
        storage.write_parquet(version.rel(HASHES), table)
        committed = version.commit({"kind": "media_hashes", "dataset": dataset, "shard": shard_key,
                                    "media_version": media_manifest["version"], "samples": table.num_rows,
                                    "undecodable": errors, "seconds": round(seconds, 2)})
    if log is not None:
        log.info(f"[{dataset} {shard_key}] hashed {table.num_rows:,} stored sample(s) in {seconds:.1f}s"
                 + (f"; {errors} could not be decoded" if errors else ""))
    return {**committed, "up_to_date": False}


def hash_shard_at(root: str, dataset: str, shard_key: str, config: HashConfig = HashConfig()) -> dict[str, Any]:
    """:func:`hash_and_commit` on the storage root ``root`` (for a worker process), through the commit gate like
    every stage; a summary row."""
    out = hash_and_commit(pipeline_storage(root), dataset, shard_key, config)
    return {"dataset": dataset, "shard": shard_key, "samples": out.get("samples", 0), "undecodable": out.get("undecodable", 0),
            "seconds": out.get("seconds", 0.0), "version": out["version"], "up_to_date": out["up_to_date"]}


def read_hashes(storage: Storage, dataset: str, shard_key: str, version: str | None = None) -> pa.Table:
    prefix = hashes_prefix(dataset, shard_key)
    version = version or storage.read_manifest(prefix)["version"]
    return storage.read_parquet(f"{prefix}/{version}/{HASHES}")


MAX_WORKERS = 256


def check_workers(workers: int) -> None:
    """``workers`` within its range (a ValueError naming the field, the value and the range)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers: {workers!r} is out of range; allowed: 0 (one per CPU core) to {MAX_WORKERS}")


def hash_all(storage: Storage, config: HashConfig, workers: int, log: Any) -> tuple[list[dict[str, Any]], int]:
    """The media-hashes stage over every committed media shard of every dataset: shards whose media version was
    hashed with this config are reused; the others are hashed ``workers`` processes at a time (0: one per CPU).
    Returns a summary row per shard, in dataset and shard order, and how many were hashed now."""
    check_workers(workers)
    todo, rows = [], []
    for ds in DATASET_NAMES:
        for key in committed_shards(storage, ds, "media"):
            media = storage.current(media_prefix(ds, key))
            done = storage.up_to_date(hashes_prefix(ds, key), hash_identity(media["version"], config))
            if done is not None:
                rows.append({"dataset": ds, "shard": key, "samples": done.get("samples", 0),
                             "undecodable": done.get("undecodable", 0), "seconds": 0.0, "version": done["version"],
                             "up_to_date": True})
                continue
            todo.append((ds, key))
    log.info(f"{len(rows)} media shard(s) up to date, {len(todo)} to hash")
    workers = workers or (os.cpu_count() or 1)
    if todo:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(hash_shard_at, storage.root, ds, key, config): (ds, key) for ds, key in todo}
            for n, fut in enumerate(as_completed(futures), 1):
                ds, key = futures[fut]
                try:
                    r = fut.result()
                except Exception as e:  # noqa: BLE001 - name the shard, keep the traceback's message
                    raise RuntimeError(f"hashing {ds} {key} failed: {type(e).__name__}: {e}") from e
                rows.append(r)
                log.info(f"[{n}/{len(todo)}] {ds} {key}: {r['samples']:,} sample(s) in {r['seconds']:.1f}s"
                         + (f", {r['undecodable']} undecodable" if r["undecodable"] else ""))
    rows.sort(key=lambda r: (DATASET_NAMES.index(r["dataset"]), r["shard"]))
    return rows, len(todo)
