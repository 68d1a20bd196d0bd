"""Raw-annotation assets: one per dataset, each a thin wrapper around a parser in ``mllm_pipeline.sources``.

Every asset reads the official file(s) named in its run config (local paths or s3:// URLs; ``paths`` is required:
an empty list is an error that writes nothing), writes normalized Parquet shards plus a quarantine table under
``<storage root>/raw/<dataset>/``, and reports what went in, what was kept and what was set aside, by reason.
A version is named by the files' content and the options (:mod:`mllm_pipeline.stages.raw`): re-running on
unchanged files is a no-op that says "up to date", and the asset's data version is that version id.
"""


from collections.abc import Callable
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.ingest.metadata import report_checks, report_metadata
from mllm_pipeline.defs.partitions import SHARDS, register_shards
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.sources.cc3m import ingest_cc3m
from mllm_pipeline.sources.cc3m_wds import ingest_cc3m_wds, list_shards
from mllm_pipeline.sources.coco import ingest_coco
from mllm_pipeline.sources.common import DEFAULT_ROWS_PER_SHARD, IngestReport, SourceFormatError
from mllm_pipeline.sources.internvid import DEFAULT_URL_TEMPLATE, ingest_internvid
from mllm_pipeline.sources.msrvtt import check_scheme, ingest_msrvtt
from mllm_pipeline.stages.raw import SCHEMA_VERSION, ingest_versioned
from mllm_pipeline.sources.webvid import ingest_webvid
from mllm_pipeline.storage import Storage

GROUP = "ingest"
PATHS_HELP = "Annotation file(s), local paths or s3:// URLs (glob patterns allowed). Required."
#: The raw assets' code version (the UI marks them changed when it moves): the normalized schema's version.
CODE_VERSION = SCHEMA_VERSION


class _RawConfig(dg.Config):
    paths: list[str] = Field(default=[], description=PATHS_HELP)
    rows_per_shard: int = Field(default=DEFAULT_ROWS_PER_SHARD, description="Rows per raw Parquet shard.")


class CC3MConfig(_RawConfig):
    split: Optional[str] = Field(default=None, description="Split name; default: from the file name (Validation -> validation).")


class CC3MWdsConfig(dg.Config):
    directory: str = Field(default="", description="Folder of cc3m-{train,validation}-NNNN.tar shards (local or s3://). Required.")
    rows_per_shard: int = Field(default=DEFAULT_ROWS_PER_SHARD, description="Rows per raw Parquet shard.")


class WebVidConfig(_RawConfig):
    split: Optional[str] = Field(default=None, description="Split name; default: from the file name (val -> val, else train).")


class MSRVTTConfig(_RawConfig):
    videos_dir: Optional[str] = Field(
        default=None, description="Folder holding video0.mp4 ... (local or s3://). Unset: the YouTube URLs with clip times."
    )
    split_scheme: str = Field(
        default="official",
        description="official (the annotation's train / validate / test, 6,513 / 497 / 2,990), 9k-1kA or 7k-1kA "
                    "(train from train_list, test = the 1,000 JSFusion videos of test_list; videos in neither list "
                    "are set aside and counted).")
    train_list: Optional[str] = Field(
        default=None, description="9k-1kA / 7k-1kA: MSRVTT_train.9k.csv or MSRVTT_train.7k.csv (column video_id).")
    test_list: Optional[str] = Field(
        default=None, description="9k-1kA / 7k-1kA: MSRVTT_JSFUSION_test.csv (,key,vid_key,video_id,sentence).")
    qa_paths: list[str] = Field(
        default=[], description="MSRVTT-QA train_qa.json / val_qa.json / test_qa.json: the questions ride on their "
                                "video's row (column qa) and become instruction samples in the manifests.")


class COCOConfig(_RawConfig):
    images_dir: Optional[str] = Field(
        default=None, description="Folder holding train2017/ and val2017/ (local or s3://). Unset: coco_url."
    )


class InternVidConfig(_RawConfig):
    min_aesthetic_score: Optional[float] = Field(default=None, description="Set aside clips with a lower Aesthetic_Score.")
    min_umt_score: Optional[float] = Field(default=None, description="Set aside clips with a lower UMT_Score.")
    url_template: str = Field(default=DEFAULT_URL_TEMPLATE, description="Video URL built from the YouTube id ('{id}').")


def _expand(paths: list[str]) -> list[str]:
    """Expand glob patterns; a pattern that matches nothing is an error that names it."""
    from mllm_pipeline.storage import filesystem_for

    out: list[str] = []
    for p in paths:
        if any(ch in p for ch in "*?["):
            fs, pattern = filesystem_for(p)
            matches = sorted(fs.glob(pattern))
            if not matches:
                raise dg.Failure(f"No file matches {p!r}.")
            scheme = p.split("://", 1)[0] + "://" if "://" in p else ""
            out.extend(scheme + m if scheme and not m.startswith(scheme) else m for m in matches)
        else:
            out.append(p)
    return out


def _paths(name: str, paths: list[str]) -> list[str]:
    """The configured files, globs expanded; none configured is an error that writes nothing."""
    if not paths:
        raise dg.Failure(
            f"{name}: config 'paths' is empty: name the annotation file(s) to ingest (local paths, s3:// URLs or glob "
            "patterns). Nothing was read or written, and the committed data and partitions are untouched. "
            "To try the pipeline on the embedded demo, run scripts/demo.sh (or the demo_pipeline job).")
    return _expand(paths)


def _run(context: dg.AssetExecutionContext, storage: Storage, ingest: Callable[..., IngestReport], source: Any,
         files: list[str], prefix: str, shards_of: Optional[str] = None, **options: Any) -> dg.MaterializeResult:
    """Ingest ``source`` unless it is unchanged; turn a format error into a failure that names the file and what
    was wrong."""
    try:
        report = ingest_versioned(ingest, source, storage, prefix=prefix, files=files, options=options, logger=context.log)
    except SourceFormatError as e:
        raise dg.Failure(description=str(e), metadata={"file": e.path, "expected": e.expected, "found": e.found}) from None
    except FileNotFoundError as e:
        raise dg.Failure(description=f"Input not found: {e.filename or e}") from None
    metadata = report_metadata(report)
    metadata["version"] = report.version
    metadata["up_to_date"] = report.up_to_date
    if shards_of is not None:  # one partition of the download stage per raw shard
        added, removed = register_shards(context.instance, shards_of, len(report.shards))
        metadata["shard_partitions"] = dg.MetadataValue.text(
            f"{SHARDS[shards_of].name}: {len(report.shards)} partition(s) ({added} new, {removed} removed)")
    return dg.MaterializeResult(metadata=metadata, check_results=report_checks(report),
                                data_version=dg.DataVersion(report.version))


def _checks(key: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec("quarantine_rate", asset=key, description="Warns when more than 5% of the rows were set aside."),
    ]


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["cc3m_annotation_files"], check_specs=_checks("raw_cc3m"))
def raw_cc3m(context: dg.AssetExecutionContext, config: CC3MConfig, storage: StorageResource) -> dg.MaterializeResult:
    """CC3M from the official TSV (caption<TAB>url, with or without a header line), one row per image."""
    paths = _paths("raw_cc3m", config.paths)
    return _run(context, storage.get(), ingest_cc3m, paths, paths, "raw/cc3m", shards_of="cc3m",
                rows_per_shard=config.rows_per_shard, split=config.split)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["cc3m_wds_annotation_files"], check_specs=_checks("raw_cc3m_wds"))
def raw_cc3m_wds(context: dg.AssetExecutionContext, config: CC3MWdsConfig, storage: StorageResource) -> dg.MaterializeResult:
    """CC3M from already-downloaded webdataset shards (pixparse/cc3m-wds layout): one partition of images_cc3m_wds
    (which adopts the images from the tars, no download) and captions_cc3m_wds per raw shard."""
    if not config.directory:
        raise dg.Failure("raw_cc3m_wds: config 'directory' is empty: name the folder of cc3m-{train,validation}-NNNN.tar "
                         "shards. Nothing was read or written.")
    try:
        files = list_shards(config.directory)
    except SourceFormatError as e:
        raise dg.Failure(description=str(e)) from None
    return _run(context, storage.get(), ingest_cc3m_wds, config.directory, files, "raw/cc3m_wds", shards_of="cc3m_wds",
                rows_per_shard=config.rows_per_shard)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["webvid_annotation_files"], check_specs=_checks("raw_webvid"))
def raw_webvid(context: dg.AssetExecutionContext, config: WebVidConfig, storage: StorageResource) -> dg.MaterializeResult:
    """WebVid-10M / 2M from the official CSV; duplicate videoids are counted and set aside."""
    paths = _paths("raw_webvid", config.paths)
    return _run(context, storage.get(), ingest_webvid, paths, paths, "raw/webvid", shards_of="webvid",
                rows_per_shard=config.rows_per_shard, split=config.split)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["msrvtt_annotation_files"], check_specs=_checks("raw_msrvtt"))
def raw_msrvtt(context: dg.AssetExecutionContext, config: MSRVTTConfig, storage: StorageResource) -> dg.MaterializeResult:
    """MSR-VTT from the videodatainfo JSON (or the flat caption list), one row per video with all its captions; the
    split scheme (official / 9k-1kA / 7k-1kA) from the split lists, and MSRVTT-QA on the videos' rows."""
    paths = _paths("raw_msrvtt", config.paths)
    try:
        check_scheme(config.split_scheme, config.train_list, config.test_list)
    except ValueError as e:
        raise dg.Failure(f"raw_msrvtt: {e}. Nothing was read or written.") from None
    qa_paths = _expand(config.qa_paths) if config.qa_paths else []
    lists = [p for p in (config.train_list, config.test_list) if p]
    return _run(context, storage.get(), ingest_msrvtt, paths, paths + lists + qa_paths, "raw/msrvtt",
                shards_of="msrvtt", rows_per_shard=config.rows_per_shard, videos_dir=config.videos_dir,
                split_scheme=config.split_scheme, train_list=config.train_list, test_list=config.test_list,
                qa_paths=qa_paths)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["coco_annotation_files"], check_specs=_checks("raw_coco"))
def raw_coco(context: dg.AssetExecutionContext, config: COCOConfig, storage: StorageResource) -> dg.MaterializeResult:
    """COCO captions 2017, images joined with their ~5 captions, one row per image."""
    paths = _paths("raw_coco", config.paths)
    return _run(context, storage.get(), ingest_coco, paths, paths, "raw/coco", shards_of="coco",
                rows_per_shard=config.rows_per_shard, images_dir=config.images_dir)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["internvid_annotation_files"], check_specs=_checks("raw_internvid"))
def raw_internvid(context: dg.AssetExecutionContext, config: InternVidConfig, storage: StorageResource) -> dg.MaterializeResult:
    """InternVid-10M-FLT clips from the JSONL file, grouped per YouTube video, with optional score thresholds."""
    paths = _paths("raw_internvid", config.paths)
    return _run(context, storage.get(), ingest_internvid, paths, paths, "raw/internvid", shards_of="internvid",
                rows_per_shard=config.rows_per_shard, min_aesthetic_score=config.min_aesthetic_score,
                min_umt_score=config.min_umt_score, url_template=config.url_template)


RAW_ASSETS = [raw_cc3m, raw_cc3m_wds, raw_webvid, raw_msrvtt, raw_coco, raw_internvid]
