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
from pydantic import Field

from mllm_pipeline.defs.conditions import FOLLOW_UPSTREAM
from mllm_pipeline.defs.ingest.metadata import markdown_table
from mllm_pipeline.defs.partitions import SHARDS, combined_version, shard_index
from mllm_pipeline.defs.plots import histogram
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.text import REASONS, CleanConfig
from mllm_pipeline.text.shards import CAPTION_DATASETS, CODE_VERSION, DEDUP_CODE_VERSION, clean_and_commit, dedup_and_commit

GROUP = "curated"


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


def _reason_table(counts: dict[str, int]) -> str:
    rows = [{"reason": r, "captions": counts.get(r, 0), "meaning": REASONS[r]} for r in REASONS if counts.get(r)]
    return markdown_table(rows, ["reason", "captions", "meaning"]) if rows else "nothing dropped"


def caption_asset(dataset: str) -> dg.AssetsDefinition:
    name = f"captions_{dataset}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)

        @dg.asset(
            name=name, group_name=GROUP, partitions_def=SHARDS[dataset], deps=[f"raw_{dataset}"], kinds={"parquet"},
            backfill_policy=dg.BackfillPolicy.single_run(), code_version=CODE_VERSION, automation_condition=FOLLOW_UPSTREAM,
            description=f"Clean {dataset} captions, one partition per raw shard: normalised, filtered, de-duplicated "
                        "within the shard; every dropped caption kept with its reason.",
        )
        def _asset(context: dg.AssetExecutionContext, config: CaptionCleanConfig, storage: StorageResource) -> dg.MaterializeResult:
            st = storage.get()
            try:
                cfg = config.clean_config()
                shards = raw_shards(st, dataset)
            except (ValueError, FileNotFoundError) as e:
                raise dg.Failure(str(e)) from None
            totals: dict[str, int] = {}
            examples: list[dict[str, Any]] = []
            rejected_examples: list[dict[str, Any]] = []
            words_kept, words_rejected = [], []
            per_shard: list[dict[str, Any]] = []
            versions: list[str] = []
            for key in context.partition_keys:
                i = shard_index(key)
                if i >= len(shards):
                    raise dg.Failure(f"{dataset} has {len(shards)} raw shard(s); there is no {key}. Materialize raw_{dataset} again.")
                result, unchanged = clean_and_commit(st, dataset, key, shards[i], cfg, context.log)
                version = st.read_manifest(f"captions/{dataset}/{key}")["version"]
                versions.append(version)
                context.add_asset_metadata({"version": version, "up_to_date": unchanged}, partition_key=key)
                c = result.counts
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
            return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(combined_version(versions)))

    return _asset


def _word_counts(rejected: pa.Table) -> np.ndarray:
    text = pc.fill_null(rejected["caption_clean"], "")
    return pc.list_value_length(pc.utf8_split_whitespace(text)).to_numpy(zero_copy_only=False)


CAPTION_ASSETS = [caption_asset(ds) for ds in CAPTION_DATASETS]


@dg.asset(
    group_name=GROUP, deps=[a.key for a in CAPTION_ASSETS], kinds={"parquet"}, code_version=DEDUP_CODE_VERSION, automation_condition=FOLLOW_UPSTREAM,
    description="Exact and near duplicates across all shards of each dataset (first in shard order wins) and against "
                "the evaluation splits (MSR-VTT test, COCO val): the captions to drop, with reason and detail.",
)
def captions_dedup(context: dg.AssetExecutionContext, config: CaptionCleanConfig, storage: StorageResource) -> dg.MaterializeResult:
    try:
        cfg = config.clean_config()
    except ValueError as e:
        raise dg.Failure(str(e)) from None
    out = dedup_and_commit(storage.get(), cfg, context.log)
    rows, eval_added, examples = out["datasets"], out["eval_captions"], out["examples"]
    cols = ["dataset", "shards", "captions_checked", "kept", "exact_duplicate", "near_duplicate", "eval_leak"]
    return dg.MaterializeResult(metadata={
        "by_dataset": dg.MetadataValue.md(markdown_table(rows, cols) if rows else "no clean captions yet"),
        "eval_captions": dg.MetadataValue.json(eval_added),
        "dropped": sum(r["exact_duplicate"] + r["near_duplicate"] + r["eval_leak"] for r in rows),
        "examples": dg.MetadataValue.md(markdown_table(examples, ["sample_id", "caption_raw", "reason", "detail"]) if examples else "none"),
        "version": out["version"], "up_to_date": out["up_to_date"],
    }, data_version=dg.DataVersion(out["version"]))
