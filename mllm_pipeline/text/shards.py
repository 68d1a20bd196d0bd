"""Clean captions on the storage root: one committed output per raw shard, and the cross-shard de-duplication.

* ``captions/<dataset>/<shard>/<version>/{kept,rejected}.parquet`` — :func:`clean_and_commit`, one raw shard;
* ``captions/_dedup/<version>/<dataset>.parquet`` — :func:`dedup_and_commit`: for each dataset, in shard order,
  exact and near duplicates across shards and against the evaluation splits (MSR-VTT test, COCO val), so nothing
  an evaluation uses is trained on. The evaluation rows themselves are kept as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.sources.common import read_raw_shards
from mllm_pipeline.storage import Storage, read_parquet
from mllm_pipeline.text.clean import ShardCleanResult, clean_shard
from mllm_pipeline.text.config import CleanConfig
from mllm_pipeline.text.dedup import DedupIndex, dedup_across

CAPTION_DATASETS = ("cc3m", "coco", "webvid", "msrvtt", "internvid")
#: evaluation splits: their captions are kept as they are and nothing in training may duplicate them
EVAL_SPLITS = {"msrvtt": ("test",), "coco": ("val",)}
DEDUP_PREFIX = "captions/_dedup"


def captions_prefix(dataset: str, shard_key: str) -> str:
    return f"captions/{dataset}/{shard_key}"


def read_kept(storage: Storage, dataset: str, shard_key: str, columns: list[str] | None = None) -> pa.Table:
    prefix = captions_prefix(dataset, shard_key)
    return storage.read_parquet(f"{prefix}/{storage.read_manifest(prefix)['version']}/kept.parquet", columns)


def committed_shards(storage: Storage, dataset: str, what: str = "captions") -> list[str]:
    """Shard keys with a committed output under ``<what>/<dataset>/``, in shard order."""
    base = f"{what}/{dataset}"
    if not storage.exists(base):
        return []
    return sorted(k for k in storage.listdir(base) if k.startswith("shard-") and storage.exists(f"{base}/{k}/_manifest.json"))


def clean_and_commit(storage: Storage, dataset: str, shard_key: str, raw_uri: str, raw_version: str,
                     config: CleanConfig) -> ShardCleanResult:
    """Clean one raw shard's captions and commit its kept and rejected tables."""
    result = clean_shard(read_parquet(raw_uri, columns=["sample_id", "captions", "split"]), dataset, config)
    with storage.new_version(captions_prefix(dataset, shard_key)) as version:
        storage.write_parquet(version.rel("kept.parquet"), result.kept)
        storage.write_parquet(version.rel("rejected.parquet"), result.rejected)
        version.commit({"dataset": dataset, "kind": "clean_captions", "shard": shard_key, "raw_version": raw_version,
                        "counts": result.counts, "examples": result.examples,
                        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "lid_model_path"}})
    return result


def _eval_rows(storage: Storage, log: Any) -> dict[str, pa.Table]:
    """The evaluation-split rows (sample_id, captions) of each dataset that has one, read once from its raw shards."""
    out: dict[str, pa.Table] = {}
    for dataset, splits in EVAL_SPLITS.items():
        try:
            uris = read_raw_shards(storage, dataset)
        except FileNotFoundError:
            log.info(f"no raw {dataset}: its evaluation split is not checked for leaks")
            continue
        parts = []
        for uri in uris:
            t = read_parquet(uri, columns=["sample_id", "captions", "split"])
            parts.append(t.filter(pc.is_in(t["split"].cast(pa.string()), pa.array(list(splits)))).select(["sample_id", "captions"]))
        out[dataset] = pa.concat_tables(parts) if parts else pa.table({"sample_id": [], "captions": []})
    return out


def dedup_and_commit(storage: Storage, config: CleanConfig, log: Any) -> dict[str, Any]:
    """Cross-shard and evaluation-leak de-duplication of every dataset with clean captions; commits the drops.
    Returns ``{"datasets": [per-dataset counts], "eval_captions": {name: count}, "examples": [...]}``."""
    eval_rows = _eval_rows(storage, log)
    index = DedupIndex(config)
    eval_added: dict[str, int] = {}
    for dataset, rows in eval_rows.items():
        if rows.num_rows:
            name = f"{dataset}_{'_'.join(EVAL_SPLITS[dataset])}"
            eval_added[name] = index.add_eval(rows, name, dataset)
    log.info(f"evaluation captions in the index: {eval_added or 'none'}")
    counts: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    with storage.new_version(DEDUP_PREFIX) as version:
        for dataset in CAPTION_DATASETS:
            shards = committed_shards(storage, dataset)
            if not shards:
                continue
            eval_ids = eval_rows[dataset]["sample_id"].combine_chunks() if dataset in eval_rows else None

            def kept_tables(dataset: str = dataset, shards: list[str] = shards, eval_ids: pa.Array | None = eval_ids):
                for key in shards:
                    kept = read_kept(storage, dataset, key)
                    if eval_ids is not None and len(eval_ids):  # the evaluation split is not checked against itself
                        kept = kept.filter(pc.invert(pc.is_in(kept["sample_id"], eval_ids)))
                    yield key, kept

            result = dedup_across(kept_tables(), index, config)
            if result.drops:
                drops = pa.concat_tables(result.drops)
                storage.write_parquet(version.rel(f"{dataset}.parquet"), drops)
                examples += drops.slice(0, max(0, 6 - len(examples))).select(["sample_id", "caption_raw", "reason", "detail"]).to_pylist()
            c = result.counts
            counts.append({"dataset": dataset, "shards": len(shards), "captions_checked": c["captions_in"],
                           "kept": c["captions_kept"], "exact_duplicate": c["exact_duplicate"],
                           "near_duplicate": c["near_duplicate"], "eval_leak": c["eval_leak"]})
            log.info(f"[{dataset}] {len(shards)} shard(s): {c}")
        summary = {"datasets": counts, "eval_captions": eval_added}
        version.commit({"kind": "caption_dedup", "summary": summary, "files": [f"{r['dataset']}.parquet" for r in counts]})
    return {**summary, "examples": examples}


def dedup_drops(storage: Storage, dataset: str) -> pa.Table | None:
    """The captions :func:`dedup_and_commit` drops for ``dataset`` (sample_id, caption_index, reason ...), or None
    when the de-duplication has not run."""
    if not storage.exists(f"{DEDUP_PREFIX}/_manifest.json"):
        return None
    rel = f"{DEDUP_PREFIX}/{storage.read_manifest(DEDUP_PREFIX)['version']}/{dataset}.parquet"
    return storage.read_parquet(rel) if storage.exists(rel) else None
