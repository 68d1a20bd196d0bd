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

from mllm_pipeline.sources.common import RawShard, raw_shards
from mllm_pipeline.storage import Storage, read_parquet
from mllm_pipeline.text.clean import ShardCleanResult, clean_shard
from mllm_pipeline.text.config import CleanConfig
from mllm_pipeline.text.dedup import DedupIndex, dedup_across

#: cc3m_wds: CC3M from pre-downloaded webdataset shards (raw_cc3m_wds), its own dataset downstream
CAPTION_DATASETS = ("cc3m", "coco", "webvid", "msrvtt", "internvid", "cc3m_wds")
#: evaluation splits: their captions are kept as they are and nothing in training may duplicate them
EVAL_SPLITS = {"msrvtt": ("test",), "coco": ("val",)}
DEDUP_PREFIX = "captions/_dedup"
#: Bump when a cleaning or de-duplication rule changes what comes out for the same captions and config.
CODE_VERSION = "captions-2"
DEDUP_CODE_VERSION = "caption-dedup-2"


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


def _config_identity(config: CleanConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items()}


def clean_and_commit(storage: Storage, dataset: str, shard_key: str, raw: RawShard, config: CleanConfig,
                     log: Any = None) -> tuple[ShardCleanResult, bool]:
    """Clean one raw shard's captions and commit its kept and rejected tables; ``(result, up_to_date)``.

    The output is named by the shard's captions (their digest), the config and :data:`CODE_VERSION`: when that is
    already committed, it is read back instead of cleaned again."""
    prefix = captions_prefix(dataset, shard_key)
    identity = {"stage": "captions", "code": CODE_VERSION, "dataset": dataset, "rows": raw.digest("captions"),
                "config": _config_identity(config)}
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


def _eval_rows(storage: Storage, log: Any) -> tuple[dict[str, pa.Table], list[dict[str, str]]]:
    """The evaluation-split rows (sample_id, captions) of each dataset that has one, read once from its raw shards,
    and the raw versions they came from."""
    out: dict[str, pa.Table] = {}
    refs: list[dict[str, str]] = []
    for dataset, splits in EVAL_SPLITS.items():
        try:
            shards = raw_shards(storage, dataset)
        except FileNotFoundError:
            log.info(f"no raw {dataset}: its evaluation split is not checked for leaks")
            continue
        parts = []
        for raw in shards:
            t = read_parquet(raw.uri, columns=["sample_id", "captions", "split"])
            parts.append(t.filter(pc.is_in(t["split"].cast(pa.string()), pa.array(list(splits)))).select(["sample_id", "captions"]))
        if shards:
            refs.append(shards[0].ref())
        out[dataset] = pa.concat_tables(parts) if parts else pa.table({"sample_id": [], "captions": []})
    return out, refs


def dedup_inputs(storage: Storage) -> list[dict[str, str]]:
    """The exact versions :func:`dedup_and_commit` reads: every committed caption shard, and the raw versions of the
    datasets with an evaluation split."""
    refs = []
    for dataset in CAPTION_DATASETS:
        for key in committed_shards(storage, dataset):
            prefix = captions_prefix(dataset, key)
            refs.append({"prefix": prefix, "version": storage.read_manifest(prefix)["version"]})
    for dataset in EVAL_SPLITS:
        m = storage.current(f"raw/{dataset}")
        if m is not None:
            refs.append({"prefix": f"raw/{dataset}", "version": m["version"]})
    return refs


def dedup_and_commit(storage: Storage, config: CleanConfig, log: Any) -> dict[str, Any]:
    """Cross-shard and evaluation-leak de-duplication of every dataset with clean captions; commits the drops.
    Returns ``{"datasets": [per-dataset counts], "eval_captions": {name: count}, "examples": [...],
    "version": ..., "up_to_date": bool}``; when the inputs and config are those of the committed result, nothing
    is recomputed."""
    inputs = dedup_inputs(storage)
    identity = {"stage": "caption_dedup", "code": DEDUP_CODE_VERSION, "inputs": inputs, "config": _config_identity(config)}
    done = storage.up_to_date(DEDUP_PREFIX, identity)
    if done is not None:
        log.info(f"up to date: {done['version']} was made from these {len(inputs)} caption and raw versions")
        return {**done["summary"], "examples": done.get("examples", []), "version": done["version"], "up_to_date": True}
    eval_rows, _ = _eval_rows(storage, log)
    index = DedupIndex(config)
    eval_added: dict[str, int] = {}
    for dataset, rows in eval_rows.items():
        if rows.num_rows:
            name = f"{dataset}_{'_'.join(EVAL_SPLITS[dataset])}"
            eval_added[name] = index.add_eval(rows, name, dataset)
    log.info(f"evaluation captions in the index: {eval_added or 'none'}")
    counts: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    with storage.new_version(DEDUP_PREFIX, identity, inputs=inputs) as version:
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
        committed = version.commit({"kind": "caption_dedup", "summary": summary, "examples": examples,
                                    "files": [f"{r['dataset']}.parquet" for r in counts]})
    return {**summary, "examples": examples, "version": committed["version"], "up_to_date": False}


def dedup_drops(storage: Storage, dataset: str, version: str | None = None) -> pa.Table | None:
    """The captions :func:`dedup_and_commit` drops for ``dataset`` (sample_id, caption_index, reason ...), or None
    when the de-duplication has not run. ``version``: that committed version (default: the current one)."""
    if version is None:
        m = storage.current(DEDUP_PREFIX)
        if m is None:
            return None
        version = m["version"]
    rel = f"{DEDUP_PREFIX}/{version}/{dataset}.parquet"
    return storage.read_parquet(rel) if storage.exists(rel) else None
