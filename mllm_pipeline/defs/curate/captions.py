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
from mllm_pipeline.defs.partitions import SHARDS, combined_version, observe_shards, rollup_key, shard_index, shard_rollup
from mllm_pipeline.defs.plots import histogram
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.text import REASONS, CleanConfig
from mllm_pipeline.text.config import DEFAULT_EVAL_SPLITS, LINGUA_CANDIDATES
from mllm_pipeline.vision.media_dedup import MediaDedupConfig
from mllm_pipeline.stages.captions import CODE_VERSION, captions_prefix, clean_and_commit
from mllm_pipeline.stages.registry import DATASET_NAMES
from mllm_pipeline.stages.dedup import DEDUP_CODE_VERSION, dedup_and_commit

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
    language_filter: str = Field(default="off", description="off, lingua (the model ships inside the package) or "
                                 "fasttext (needs lid_model_path).")
    lid_model_path: Optional[str] = Field(default=None, description="Local fastText language-id model (lid.176.bin), for language_filter: fasttext.")
    languages: list[str] = Field(default=["en"], description="Languages kept when the language filter is on.")
    language_candidates: list[str] = Field(default=list(LINGUA_CANDIDATES), description="lingua: the languages it "
                                           "chooses among (empty: all 75; slower and less decisive).")
    dedup_scope: str = Field(default="medium", description="medium: caption duplicates only among one image's or "
                             "clip's captions (different images keep a shared caption); dataset: across the dataset.")
    eval_splits: list[str] = Field(default=list(DEFAULT_EVAL_SPLITS), description="Source split names that are "
                                   "evaluation data: never filtered or de-duplicated; training copies of them are dropped.")
    max_caption_repeats: Optional[int] = Field(default=None, description="Keep one caption at most this many times in "
                                               "training across all media (concept balancing); empty = no cap.")

    def clean_config(self) -> CleanConfig:
        return dataclasses.replace(
            CleanConfig(), min_words=self.min_words, min_chars=self.min_chars, max_words=self.max_words,
            min_letter_fraction=self.min_letter_fraction, max_repeated_ngram_fraction=self.max_repeated_ngram_fraction,
            exact_dedup=self.exact_dedup, near_dedup=self.near_dedup, near_dup_threshold=self.near_dup_threshold,
            dataset_rules=self.dataset_rules, lid_model_path=self.lid_model_path, languages=tuple(self.languages),
            language_filter="fasttext" if self.language_filter == "off" and self.lid_model_path else self.language_filter,
            language_candidates=tuple(self.language_candidates), dedup_scope=self.dedup_scope, eval_splits=tuple(self.eval_splits), max_caption_repeats=self.max_caption_repeats,
        )


class CaptionDedupConfig(CaptionCleanConfig):
    media_dedup: bool = Field(default=True, description="Find media copies (exact bytes and perceptual hashes from "
                              "media_hashes): a copy's captions move to the sample kept; copies of evaluation media are dropped.")
    media_near: bool = Field(default=True, description="Also near copies (re-encoded, resized), not only the same bytes.")
    media_max_distance: int = Field(default=4, description="Largest perceptual-hash distance (bits of 64) of a near copy.")

    def media_config(self) -> MediaDedupConfig:
        return MediaDedupConfig(enabled=self.media_dedup, near=self.media_near, max_distance=self.media_max_distance)


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
            md = observe_shards(context, name, dataset, st, lambda key: captions_prefix(dataset, key), md)
            return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(combined_version(versions)))

    return _asset


def _word_counts(rejected: pa.Table) -> np.ndarray:
    text = pc.fill_null(rejected["caption_clean"], "")
    return pc.list_value_length(pc.utf8_split_whitespace(text)).to_numpy(zero_copy_only=False)


CAPTION_ASSETS = [caption_asset(ds) for ds in DATASET_NAMES]
#: their roll-ups (defs/partitions.py): what the stages reading every caption shard depend on
CAPTION_ROLLUPS = [shard_rollup(f"captions_{ds}", ds, lambda key, ds=ds: captions_prefix(ds, key), GROUP)
                   for ds in DATASET_NAMES]


@dg.asset(
    group_name=GROUP, deps=[rollup_key(a.key.to_user_string()) for a in CAPTION_ASSETS] + ["media_hashes"], kinds={"parquet"}, code_version=DEDUP_CODE_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    description="Across all shards and datasets: training captions that copy an evaluation caption, media copies "
                "(same bytes or perceptual hash; a copy's captions move to the sample kept, copies of evaluation media "
                "are dropped) and, optionally, a cap on how often one caption appears. Evaluation splits are never "
                "reduced. Writes what the manifests leave out and move, with reason and detail.",
)
def captions_dedup(context: dg.AssetExecutionContext, config: CaptionDedupConfig, storage: StorageResource) -> dg.MaterializeResult:
    try:
        cfg = config.clean_config()
        mcfg = config.media_config()
        out = dedup_and_commit(storage.get(), cfg, context.log, mcfg)
    except ValueError as e:
        raise dg.Failure(str(e)) from None
    rows, eval_added, examples = out["datasets"], out["eval_captions"], out["examples"]
    cols = ["dataset", "shards", "captions_checked", "kept", "eval_leak", "media_duplicate", "captions_merged",
            "exact_duplicate", "near_duplicate", "caption_cap"]
    media = out.get("media") or {}
    return dg.MaterializeResult(metadata={
        "by_dataset": dg.MetadataValue.md(markdown_table(rows, cols) if rows else "no clean captions yet"),
        "eval_captions": dg.MetadataValue.json(eval_added),
        "eval_samples": dg.MetadataValue.json(out.get("eval_samples", {})),
        "media": dg.MetadataValue.json(media) if media else "media duplicates not looked for (no media hashes)",
        "dropped": sum(r["exact_duplicate"] + r["near_duplicate"] + r["eval_leak"] + r.get("media_duplicate", 0)
                       + r.get("caption_cap", 0) for r in rows),
        "merged": sum(r.get("captions_merged", 0) for r in rows),
        "examples": dg.MetadataValue.md(markdown_table(examples, ["sample_id", "caption_raw", "reason", "detail"]) if examples else "none"),
        "version": out["version"], "up_to_date": out["up_to_date"],
    }, data_version=dg.DataVersion(out["version"]))
