"""Clean-caption assets: per raw shard (partitioned like the media), then one cross-shard de-duplication.

* ``captions_<dataset>`` (one partition per raw shard): normalise, filter and de-duplicate within the shard
  (:func:`mllm_pipeline.text.clean_shard`). Writes ``captions/<dataset>/<shard>/<version>/{kept,rejected}.parquet``.
* ``captions_dedup``: for each dataset, in shard order, exact and near duplicates across shards and against the
  evaluation splits (MSR-VTT test, COCO val), so nothing leaks into training. Writes
  ``captions/_dedup/<version>/<dataset>.parquet`` (the captions it drops, with reason and detail). The manifests
  read kept captions minus these.
"""


import dataclasses
import warnings
from typing import Any, Optional

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.partitions import SHARDS, raw_shard_uris, shard_index
from mllm_pipeline.defs.plots import histogram
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.storage import Storage, read_parquet
from mllm_pipeline.text import REASONS, CleanConfig, DedupIndex, clean_shard, dedup_across

GROUP = "curated"
CAPTION_DATASETS = ("cc3m", "coco", "webvid", "msrvtt", "internvid")
#: evaluation splits: their captions are kept as they are and nothing in training may duplicate them
EVAL_SPLITS = {"msrvtt": ("test",), "coco": ("val",)}


class CaptionCleanConfig(dg.Config):
    min_words: int = Field(default=3, description="Keep captions with at least this many words (DataComp: more than 2).")
    min_chars: int = Field(default=6, description="... and at least this many characters (DataComp: more than 5).")
    max_words: int = Field(default=256, description="Longer captions are dropped as too_long.")
    min_letter_fraction: float = Field(default=0.5, description="Captions with a lower share of letters are dropped.")
    max_repeated_ngram_fraction: float = Field(default=0.5, description="Share of repeated word 2-grams at which a caption is dropped (1 = off).")
    exact_dedup: bool = Field(default=True, description="Drop exact duplicates (case, punctuation and spacing ignored).")
    near_dedup: bool = Field(default=True, description="Drop near duplicates (MinHash + LSH).")
    near_dup_threshold: float = Field(default=0.8, description="Estimated Jaccard similarity at which a caption is a near duplicate.")
    dataset_rules: bool = Field(default=True, description="Apply the dataset's own rules (WebVid stock-footage boilerplate).")
    lid_model_path: Optional[str] = Field(default=None, description="Local fastText language-id model (lid.176.bin); empty = no language filter.")
    languages: list[str] = Field(default=["en"], description="Languages kept when the language filter is on.")

    def clean_config(self) -> CleanConfig:
        return dataclasses.replace(
            CleanConfig(), min_words=self.min_words, min_chars=self.min_chars, max_words=self.max_words,
            min_letter_fraction=self.min_letter_fraction, max_repeated_ngram_fraction=self.max_repeated_ngram_fraction,
            exact_dedup=self.exact_dedup, near_dedup=self.near_dedup, near_dup_threshold=self.near_dup_threshold,
            dataset_rules=self.dataset_rules, lid_model_path=self.lid_model_path, languages=tuple(self.languages),
        )


def captions_prefix(dataset: str, shard_key: str) -> str:
    return f"captions/{dataset}/{shard_key}"


def _reason_table(counts: dict[str, int]) -> str:
    rows = [{"reason": r, "captions": counts.get(r, 0), "meaning": REASONS[r]} for r in REASONS if counts.get(r)]
    return markdown_table(rows, ["reason", "captions", "meaning"]) if rows else "nothing dropped"


def _write_parquet(storage: Storage, rel: str, table: pa.Table) -> None:
    with storage.open(rel, "wb") as f:
        pq.write_table(table, f, compression="zstd")


def _read_parquet(storage: Storage, rel: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open(rel, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_kept(storage: Storage, dataset: str, shard_key: str, columns: list[str] | None = None) -> pa.Table:
    prefix = captions_prefix(dataset, shard_key)
    return _read_parquet(storage, f"{prefix}/{storage.read_manifest(prefix)['version']}/kept.parquet", columns)


def caption_asset(dataset: str) -> dg.AssetsDefinition:
    name = f"captions_{dataset}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)

        @dg.asset(
            name=name, group_name=GROUP, partitions_def=SHARDS[dataset], deps=[f"raw_{dataset}"], kinds={"parquet"},
            backfill_policy=dg.BackfillPolicy.single_run(),
            check_specs=[dg.AssetCheckSpec("captions_accounted", asset=name,
                                           description="captions_in == kept + rejected, for every shard.")],
            description=f"Clean {dataset} captions, one partition per raw shard: normalised, filtered, de-duplicated "
                        "within the shard; every dropped caption kept with its reason.",
        )
        def _asset(context: dg.AssetExecutionContext, config: CaptionCleanConfig, storage: StorageResource) -> dg.MaterializeResult:
            st = storage.get()
            try:
                cfg = config.clean_config()
                raw_manifest, uris = raw_shard_uris(st, dataset)
            except (ValueError, FileNotFoundError) as e:
                raise dg.Failure(str(e)) from None
            totals: dict[str, int] = {}
            examples: list[dict[str, Any]] = []
            rejected_examples: list[dict[str, Any]] = []
            words_kept, words_rejected = [], []
            per_shard: list[dict[str, Any]] = []
            accounted = True
            for key in context.partition_keys:
                i = shard_index(key)
                if i >= len(uris):
                    raise dg.Failure(f"{dataset} has {len(uris)} raw shard(s); there is no {key}. Materialize raw_{dataset} again.")
                table = read_parquet(uris[i], columns=["sample_id", "captions", "split"])
                result = clean_shard(table, dataset, cfg)
                with st.new_version(captions_prefix(dataset, key)) as version:
                    _write_parquet(st, version.rel("kept.parquet"), result.kept)
                    _write_parquet(st, version.rel("rejected.parquet"), result.rejected)
                    version.commit({"dataset": dataset, "kind": "clean_captions", "shard": key,
                                    "raw_version": raw_manifest["version"], "counts": result.counts,
                                    "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "lid_model_path"},
                                    "examples": result.examples})
                c = result.counts
                accounted &= c["captions_in"] == c["captions_kept"] + c["captions_rejected"]
                for k, v in c.items():
                    totals[k] = totals.get(k, 0) + int(v)
                per_shard.append({"shard": key, "captions_in": c["captions_in"], "kept": c["captions_kept"],
                                  "rejected": c["captions_rejected"], "changed": c.get("captions_changed", 0)})
                examples += result.examples[: max(0, 8 - len(examples))]
                rej = result.rejected.slice(0, max(0, 8 - len(rejected_examples))).to_pylist()
                rejected_examples += [{"caption": r["caption_raw"], "reason": r["reason"], "detail": r["detail"]} for r in rej]
                words_kept.append(result.kept["n_words"].to_numpy(zero_copy_only=False))
                words_rejected.append(_word_counts(result.rejected))
                context.log.info(f"[{dataset} {key}] {c['captions_kept']:,}/{c['captions_in']:,} captions kept; "
                                 f"dropped: { {r: c[r] for r in REASONS if c.get(r)} }")
            md: dict[str, Any] = {
                "captions_in": totals.get("captions_in", 0), "captions_kept": totals.get("captions_kept", 0),
                "captions_rejected": totals.get("captions_rejected", 0),
                "dagster/row_count": totals.get("captions_kept", 0),
                "kept_rate": round(totals.get("captions_kept", 0) / max(1, totals.get("captions_in", 0)), 4),
                "dropped_by_reason": dg.MetadataValue.md(_reason_table(totals)),
                "before_after": dg.MetadataValue.md(markdown_table(examples, ["sample_id", "before", "after"]) if examples else "no caption changed"),
                "rejected_examples": dg.MetadataValue.md(markdown_table(rejected_examples, ["caption", "reason", "detail"]) if rejected_examples else "none"),
                "shards": dg.MetadataValue.md(markdown_table(per_shard, ["shard", "captions_in", "kept", "rejected", "changed"])),
                "location": st.uri(f"captions/{dataset}"),
            }
            hist = histogram({"kept": np.concatenate(words_kept) if words_kept else [],
                              "rejected": np.concatenate(words_rejected) if words_rejected else []},
                             f"{dataset}: caption length", "words", bins=30)
            if hist:
                md["caption_length"] = dg.MetadataValue.md(hist)
            return dg.MaterializeResult(metadata=md, check_results=[dg.AssetCheckResult(
                check_name="captions_accounted", passed=bool(accounted), metadata={"shards": len(per_shard)})])

    return _asset


def _word_counts(rejected: pa.Table) -> np.ndarray:
    text = pc.fill_null(rejected["caption_clean"], "")
    return pc.list_value_length(pc.utf8_split_whitespace(text)).to_numpy(zero_copy_only=False)


CAPTION_ASSETS = [caption_asset(ds) for ds in CAPTION_DATASETS]


def committed_shards(storage: Storage, dataset: str, what: str = "captions") -> list[str]:
    """Shard keys with a committed output under ``<what>/<dataset>/``, in shard order."""
    base = f"{what}/{dataset}"
    if not storage.exists(base):
        return []
    return sorted(k for k in storage.listdir(base) if k.startswith("shard-") and storage.exists(f"{base}/{k}/_manifest.json"))


def eval_index(storage: Storage, config: CleanConfig, log: Any) -> tuple[DedupIndex, dict[str, int]]:
    """The evaluation splits' captions (MSR-VTT test, COCO val) from the raw shards, as a de-duplication index."""
    index = DedupIndex(config)
    added: dict[str, int] = {}
    for dataset, splits in EVAL_SPLITS.items():
        try:
            _, uris = raw_shard_uris(storage, dataset)
        except FileNotFoundError:
            log.info(f"no raw {dataset}: its evaluation split is not checked for leaks")
            continue
        for uri in uris:
            t = read_parquet(uri, columns=["sample_id", "captions", "split"])
            t = t.filter(pc.is_in(t["split"].cast(pa.string()), pa.array(list(splits))))
            if t.num_rows:
                name = f"{dataset}_{'_'.join(splits)}"
                added[name] = added.get(name, 0) + index.add_eval(t.select(["sample_id", "captions"]), name, dataset)
    return index, added


def _eval_sample_ids(storage: Storage, dataset: str) -> set[str]:
    if dataset not in EVAL_SPLITS:
        return set()
    _, uris = raw_shard_uris(storage, dataset)
    ids: set[str] = set()
    for uri in uris:
        t = read_parquet(uri, columns=["sample_id", "split"])
        t = t.filter(pc.is_in(t["split"].cast(pa.string()), pa.array(list(EVAL_SPLITS[dataset]))))
        ids.update(t["sample_id"].to_pylist())
    return ids


@dg.asset(
    group_name=GROUP, deps=[a.key for a in CAPTION_ASSETS], kinds={"parquet"},
    description="Exact and near duplicates across all shards of each dataset (first in shard order wins) and against "
                "the evaluation splits (MSR-VTT test, COCO val): the captions to drop, with reason and detail.",
)
def captions_dedup(context: dg.AssetExecutionContext, config: CaptionCleanConfig, storage: StorageResource) -> dg.MaterializeResult:
    st = storage.get()
    cfg = config.clean_config()
    index, eval_added = eval_index(st, cfg, context.log)
    context.log.info(f"evaluation captions in the index: {eval_added or 'none'}")
    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    with st.new_version("captions/_dedup") as version:
        for dataset in CAPTION_DATASETS:
            shards = committed_shards(st, dataset)
            if not shards:
                continue
            eval_ids = _eval_sample_ids(st, dataset)

            def kept_tables(dataset: str = dataset, shards: list[str] = shards, eval_ids: set[str] = eval_ids):
                for key in shards:
                    kept = read_kept(st, dataset, key)
                    if eval_ids:  # the evaluation split itself is not checked against itself
                        kept = kept.filter(pc.invert(pc.is_in(kept["sample_id"], pa.array(sorted(eval_ids)))))
                    yield key, kept

            result = dedup_across(kept_tables(), index, cfg)
            drops = pa.concat_tables(result.drops) if result.drops else None
            if drops is not None:
                _write_parquet(st, version.rel(f"{dataset}.parquet"), drops)
                examples += drops.slice(0, max(0, 6 - len(examples))).select(["sample_id", "caption_raw", "reason", "detail"]).to_pylist()
            c = result.counts
            rows.append({"dataset": dataset, "shards": len(shards), "captions_checked": c["captions_in"],
                         "kept": c["captions_kept"], "exact_duplicate": c["exact_duplicate"],
                         "near_duplicate": c["near_duplicate"], "eval_leak": c["eval_leak"]})
            context.log.info(f"[{dataset}] {len(shards)} shard(s): {c}")
        summary = {"datasets": rows, "eval_captions": eval_added}
        version.commit({"kind": "caption_dedup", "summary": summary, "files": [f"{r['dataset']}.parquet" for r in rows]})
    cols = ["dataset", "shards", "captions_checked", "kept", "exact_duplicate", "near_duplicate", "eval_leak"]
    return dg.MaterializeResult(metadata={
        "by_dataset": dg.MetadataValue.md(markdown_table(rows, cols) if rows else "no clean captions yet"),
        "eval_captions": dg.MetadataValue.json(eval_added),
        "dropped": sum(r["exact_duplicate"] + r["near_duplicate"] + r["eval_leak"] for r in rows),
        "examples": dg.MetadataValue.md(markdown_table(examples, ["sample_id", "caption_raw", "reason", "detail"]) if examples else "none"),
    })


def dedup_drops(storage: Storage, dataset: str) -> pa.Table | None:
    """The captions ``captions_dedup`` drops for ``dataset`` (sample_id, caption_index, reason ...), if any."""
    if not storage.exists("captions/_dedup/_manifest.json"):
        return None
    m = storage.read_manifest("captions/_dedup")
    rel = f"captions/_dedup/{m['version']}/{dataset}.parquet"
    return _read_parquet(storage, rel) if storage.exists(rel) else None
