"""The tokenized-manifest asset: clean captions + media shards (WebVid after its watermark stage) -> per-split
Parquet training manifests. See :mod:`mllm_pipeline.manifests.build` for the columns; the trainers' files (LLaVA
JSON among them) are the export assets'."""


from typing import Any, Optional

import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.curate.captions import CAPTION_ROLLUPS, captions_dedup
from mllm_pipeline.defs.curate.watermark import WATERMARK_ROLLUP
from mllm_pipeline.defs.conditions import FOLLOW_UPSTREAM
from mllm_pipeline.defs.tables import counts_table, table
from mllm_pipeline.defs.media.assets import MEDIA_ROLLUPS
from mllm_pipeline.defs.plots import histogram
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.manifests import ManifestConfig, TemplateConfig, TokenizeConfig
from mllm_pipeline.manifests.build import EVAL_SPLITS
from mllm_pipeline.manifests.conversation import DEFAULT_IMAGE_INSTRUCTIONS, DEFAULT_VIDEO_INSTRUCTIONS
from mllm_pipeline.stages.manifests import CODE_VERSION, ConfigError, InconsistentInputs, materialize_manifests


class ManifestAssetConfig(dg.Config):
    tokenizer: str = Field(
        default="",
        description="Required: the LLM's tokenizer, a local directory or a hub name available offline (the one the "
        "model trains with).",
    )
    template_style: str = Field(default="instruct", description="instruct (an instruction + the placeholder) or plain (LLaVA pretraining: the placeholder alone).")
    image_instructions: list[str] = Field(default=list(DEFAULT_IMAGE_INSTRUCTIONS), description="Instructions for images, one picked per sample (deterministically).")
    video_instructions: list[str] = Field(default=list(DEFAULT_VIDEO_INSTRUCTIONS), description="Instructions for videos.")
    chat_format: str = Field(default="auto", description="auto: InternLM2's official turns ([UNUSED_TOKEN_146]user ... "
                             "[UNUSED_TOKEN_145], then </s>) for an InternLM2 tokenizer, else the tokenizer's chat "
                             "template if it has one, else 'USER: ... ASSISTANT: ...'; internlm2 or simple: always that one.")
    max_seq_len: int = Field(default=4096, description="Text plus media tokens.")
    overlength: str = Field(default="drop", description="drop, or truncate the answer (media tokens are never cut).")
    hd_num: int = Field(default=9, description="HD crops per image the model uses (image tokens are counted for it).")
    video_frames: int = Field(default=8, description="Frames the model samples per video.")
    video_hd_num: int = Field(default=1, description="HD crops per video frame.")
    val_fraction: float = Field(default=0.01, description="Share of samples (whose source has no evaluation split) in val.")
    test_fraction: float = Field(default=0.0, description="Share in test.")
    datasets: Optional[list[str]] = Field(default=None, description="Only these datasets (default: every dataset with clean captions and media).")
    eval_splits: list[str] = Field(default=list(EVAL_SPLITS), description="Source split names that are evaluation "
                                   "splits (kept as they are: 'test' when the name says test, else 'val'); the same "
                                   "list as the captions' eval_splits.")
    qa_samples: str = Field(default="per_question", description="Question/answer pairs of the raw 'qa' column (MSRVTT-QA): "
                            "per_question (one instruction sample a pair), turns (one sample a video and split, every pair a "
                            "turn) or none.")

    def manifest_config(self) -> ManifestConfig:
        template = TemplateConfig(style=self.template_style, image_instructions=tuple(self.image_instructions),
                                  video_instructions=tuple(self.video_instructions))
        tok = TokenizeConfig(template=template, chat_format=self.chat_format, max_seq_len=self.max_seq_len,
                             overlength=self.overlength)
        return ManifestConfig(tokenize=tok, hd_num=self.hd_num, video_frames=self.video_frames,
                              video_hd_num=self.video_hd_num, val_fraction=self.val_fraction,
                              test_fraction=self.test_fraction, eval_splits=tuple(s.lower() for s in self.eval_splits),
                              qa_samples=self.qa_samples)


EVAL_COLUMNS = {"samples_in": "samples of the evaluation split / set in the raw inputs",
                "samples_out": "those in the evaluation manifests",
                "without_media": "samples whose media could not be fetched (the only ones allowed to be missing)",
                "whole": "every sample with media kept"}


def _by_dataset_split(counts: dict[str, int]) -> list[dict[str, Any]]:
    """``{"<dataset>.<split>": n}`` as rows of dataset, split and samples."""
    rows = []
    for key, n in sorted(counts.items()):
        dataset, _, split = key.rpartition(".")
        rows.append({"dataset": dataset, "split": split, "samples": int(n)})
    return rows


@dg.asset(
    group_name="manifests", kinds={"parquet", "json"},
    deps=[r.key for r in CAPTION_ROLLUPS] + [captions_dedup.key] + [r.key for r in MEDIA_ROLLUPS] + [WATERMARK_ROLLUP.key],
    code_version=CODE_VERSION, automation_condition=FOLLOW_UPSTREAM,
    description="Tokenized training manifests per split (Parquet), from clean captions and media shards (WebVid "
                "after its watermark stage). The trainers' files are the export_* assets. Metadata: samples by "
                "split and by dataset x split, the inputs per shard, and the evaluation-protection summary (every "
                "evaluation split and declared evaluation set kept whole).",
)
def manifests(context: dg.AssetExecutionContext, config: ManifestAssetConfig, storage: StorageResource) -> dg.MaterializeResult:
    try:
        cfg = config.manifest_config()
        result = materialize_manifests(storage.get(), tokenizer=config.tokenizer, config=cfg,
                                       config_record=config.model_dump(), datasets=config.datasets, log=context.log)
    except (ConfigError, InconsistentInputs) as e:
        raise dg.Failure(str(e)) from None
    committed, summary, inputs, seq = result.committed, result.summary, result.shard_inputs, result.seq_lens
    splits = summary["splits"]
    md: dict[str, Any] = {
        "dagster/row_count": sum(splits.values()),
        "samples_by_split": counts_table(splits, "split"),
        "samples_by_dataset": table(_by_dataset_split(summary["by_dataset"]), ["dataset", "split", "samples"],
                                    {"samples": "samples of the dataset in the split's manifest"}),
        "seq_len": dg.MetadataValue.json(summary["seq_len"]),
        "over_max_seq_len": dg.MetadataValue.md(
            f"max_seq_len {cfg.tokenize.max_seq_len}, overlength: **{cfg.tokenize.overlength}** — "
            f"{summary['dropped_too_long']} dropped (in rejected.parquet), {summary['truncated']} truncated"),
        "inputs": table(inputs, ["dataset", "shard", "captions", "after_dedup", "media", "usable_media", "note"]),
        "files": dg.MetadataValue.json(summary["files"]),
        "tokenizer": summary["tokenizer"],
        "location": committed["location"],
        "version": committed["version"],
        "up_to_date": seq is None,
        "upstream_versions": table(committed["inputs"], ["prefix", "version"]),
    }
    if seq is not None:
        pic = histogram({"samples": seq}, "sequence length (text + media tokens)", "tokens", bins=40,
                        vline=float(cfg.tokenize.max_seq_len))
        if pic:
            md["seq_len_distribution"] = dg.MetadataValue.md(pic)
    evals = summary.get("eval_splits", [])
    md["evaluation_splits"] = table(evals, ["dataset", "split", "samples_in", "samples_out", "captions_in", "captions_out",
                                            "without_media", "whole"], EVAL_COLUMNS)
    md["missing_shards"] = table(summary.get("missing_shards", []), ["dataset", "raw_shards", "built", "missing", "which"],
                                 {"missing": "raw shards without committed media and captions, not in these manifests"})
    sets = summary.get("eval_sets", [])
    if sets:
        md["evaluation_sets"] = table(sets, ["dataset", "eval_set", "samples_in", "samples_out", "without_media", "whole"],
                                      EVAL_COLUMNS)
    return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(committed["version"]))

