"""Raw-annotation assets: one per dataset, each a thin wrapper around a parser in ``mllm_pipeline.sources``.

Every asset reads the official file(s) named in its run config (local paths or s3:// URLs; ``paths`` is required:
an empty list is an error that writes nothing), writes normalized Parquet shards plus a quarantine table under
``<storage root>/raw/<dataset>/``, and reports what went in, what was kept and what was set aside, by reason.
A version is named by the files' content and the options (:mod:`mllm_pipeline.stages.raw`): re-running on
unchanged files is a no-op that says "up to date", and the asset's data version is that version id.
"""


from collections.abc import Callable, Iterator
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from mllm_pipeline.defs.ingest.metadata import report_metadata
from mllm_pipeline.stages.registry import DATASETS
from mllm_pipeline.defs.partitions import SHARDS, register_shards
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.sources.cc3m import ingest_cc3m
from mllm_pipeline.sources.cc3m_wds import ingest_cc3m_wds, list_shards
from mllm_pipeline.sources.coco import ingest_coco
from mllm_pipeline.sources.common import DEFAULT_MAX_QUARANTINE_RATE, DEFAULT_ROWS_PER_SHARD, IngestReport, SourceFormatError
from mllm_pipeline.stages.gate import CheckFailed
from mllm_pipeline.sources.internvid import DEFAULT_CLIP_NAME_PATTERN, DEFAULT_URL_TEMPLATE, check_clip_name_pattern, ingest_internvid
from mllm_pipeline.sources.msrvtt import MC_OVERLAP, check_scheme, ingest_msrvtt
from mllm_pipeline.stages.raw import SCHEMA_VERSION, ingest_versioned
from mllm_pipeline.sources.webvid import ingest_webvid
from mllm_pipeline.storage import Storage

GROUP = "ingest"
PATHS_HELP = "Annotation file(s), local paths or s3:// URLs (glob patterns allowed). Required."
#: The raw assets' code version (the UI marks them changed when it moves): the normalized schema's version.
CODE_VERSION = SCHEMA_VERSION


EVAL_SETS_HELP = (
    "Declared evaluation sets: files naming media an evaluation uses (COCO's Karpathy dataset_coco.json or "
    "coco_karpathy_test.json / _val.json, msrvtt_ret_test1k.json, a list of ids or file names). The rows they name "
    "become evaluation samples of that set (split test / val), kept whole and out of training by id and media hash.")


CEILING_HELP = (
    "The share of the rows read that may be set aside before the new version is refused at commit (the current "
    "version and its partitions stay as they were); set-asides a split scheme makes on purpose are not counted.")


class _RawConfig(dg.Config):
    paths: list[str] = Field(default=[], description=PATHS_HELP)
    rows_per_shard: int = Field(default=DEFAULT_ROWS_PER_SHARD, description="Rows per raw Parquet shard.")
    eval_sets: list[str] = Field(default=[], description=EVAL_SETS_HELP)
    max_quarantine_rate: float = Field(default=DEFAULT_MAX_QUARANTINE_RATE, description=CEILING_HELP)


class CC3MConfig(_RawConfig):
    split: Optional[str] = Field(default=None, description="Split name; default: from the file name (Validation -> validation).")


class CC3MWdsConfig(dg.Config):
    directory: str = Field(default="", description="Folder of cc3m-{train,validation}-NNNN.tar shards (local or s3://). Required.")
    rows_per_shard: int = Field(default=DEFAULT_ROWS_PER_SHARD, description="Rows per raw Parquet shard.")
    eval_sets: list[str] = Field(default=[], description=EVAL_SETS_HELP)
    max_quarantine_rate: float = Field(default=DEFAULT_MAX_QUARANTINE_RATE, description=CEILING_HELP)


FETCH_MISSING_HELP = (
    "With local media configured: a row whose media is not there keeps its URL, and the media stage fetches it "
    "(true, the default), or is set aside as media_file_missing (false). Either way it is counted "
    "(media_not_on_disk).")


class WebVidConfig(_RawConfig):
    split: Optional[str] = Field(default=None, description="Split name; default: from the file name (val -> val, else train).")
    videos_dir: Optional[str] = Field(
        default=None, description="Folder of videos you already have, named <videoid>.mp4 (local or s3://): those rows "
                                  "get their path and are adopted by videos_webvid, not downloaded.")
    video2dataset_dir: Optional[str] = Field(
        default=None, description="An earlier video2dataset output folder (00000.tar ...; run with "
                                  "--save_additional_columns including videoid): each row is matched to the sample whose "
                                  "json has its videoid, and adopted from the tar. Looked up after videos_dir.")
    fetch_missing: bool = Field(default=True, description=FETCH_MISSING_HELP)


def _local_media(name: str, fetch_missing: bool, folder: Optional[str], tars: Optional[str],
                 **options: Any) -> dict[str, Any]:
    """The raw options for media already on disk ({} when none is configured, so versions made without stay
    current): ``options`` (the folders), ``fetch_missing`` and the digest of the listing of ``folder`` (files) and
    ``tars`` (a video2dataset output), so the version changes when files are added or removed."""
    if not folder and not tars:
        if not fetch_missing:
            raise dg.Failure(f"{name}: fetch_missing: false needs a folder of local media to look in. Nothing was read "
                             "or written.")
        return {}
    from mllm_pipeline.sources.local_media import listing_digest

    try:
        listing = listing_digest(folder, tars)
    except SourceFormatError as e:
        raise dg.Failure(description=f"{name}: {e} Nothing was read or written.") from None
    return {**options, "fetch_missing": fetch_missing, "media_listing": listing}


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
                                "video's row (column qa) and become instruction samples in the manifests. (QA files "
                                "of the MMAction2 folder may also be listed in paths: they are recognised by their fields.)")
    file_splits: dict[str, str] = Field(
        default={}, description="File name -> split, for caption and QA files whose name does not say it (by default "
                                "'train', 'val' or 'test' in the name: msrvtt_ret_test1k.json -> test).")
    mc_overlap: str = Field(
        default="training", description="msrvtt_mc_test.json holds the 2,990 official test videos; under 9k-1kA 1,990 "
                                        "of them are training videos. 'training' keeps them training (counted in "
                                        "the report), 'evaluation' moves them to the test split.")


class COCOConfig(_RawConfig):
    images_dir: Optional[str] = Field(
        default=None, description="Folder holding train2017/ and val2017/ (local or s3://). Unset: coco_url."
    )


class InternVidConfig(_RawConfig):
    min_aesthetic_score: Optional[float] = Field(default=None, description="Set aside clips with a lower Aesthetic_Score.")
    min_umt_score: Optional[float] = Field(default=None, description="Set aside clips with a lower UMT_Score.")
    url_template: str = Field(default=DEFAULT_URL_TEMPLATE, description="Video URL built from the YouTube id ('{id}').")
    clips_dir: Optional[str] = Field(
        default=None, description="Folder of clips already cut (local or s3://), named by clip_name_pattern: those "
                                  "clips get their path and are adopted by videos_internvid, not fetched and cut.")
    clip_name_pattern: str = Field(
        default=DEFAULT_CLIP_NAME_PATTERN,
        description="A clip's file under clips_dir, from {youtube_id}, {start} and {end} (Start_timestamp / "
                    "End_timestamp as the JSONL spells them, HH:MM:SS.mmm) or {start_ms} / {end_ms} (milliseconds); "
                    "may contain '/'. Default: {youtube_id}_{start}_{end}.mp4.")
    fetch_missing: bool = Field(default=True, description=FETCH_MISSING_HELP)


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
    was wrong. ``eval_sets`` (declared evaluation-set files) are read with the sources and passed on when given."""
    eval_sets = _expand(list(options.pop("eval_sets", None) or []))
    if eval_sets:
        options["eval_sets"] = eval_sets
        files = list(files) + eval_sets
    if options.get("max_quarantine_rate") == DEFAULT_MAX_QUARANTINE_RATE:
        options.pop("max_quarantine_rate")
    try:
        report = ingest_versioned(ingest, source, storage, prefix=prefix, files=files, options=options, logger=context.log)
    except SourceFormatError as e:
        raise dg.Failure(description=str(e), metadata={"file": e.path, "expected": e.expected, "found": e.found}) from None
    except FileNotFoundError as e:
        name = str(e.filename or e)
        if any(name.rstrip("/") in f or f in name for f in files):
            raise dg.Failure(description=f"Input not found: {name}. Nothing was written.") from None
        raise dg.Failure(description=f"{prefix}: the storage root {storage.root} cannot be written ({name} not found: "
                                     "a missing bucket or folder?). Create it, or point MLLM_STORAGE_ROOT (the storage "
                                     "resource's root) at one that exists. Nothing was written.") from None
    except IsADirectoryError as e:
        raise dg.Failure(description=f"{e.filename} is a folder, not a file: name the files in it, or a glob such as "
                                     f"{str(e.filename).rstrip('/')}/*.json. Nothing was written.") from None
    except OSError as e:  # a symlink loop, a permission, a device error: name the file and the system's reason
        raise dg.Failure(description=f"{prefix}: cannot read {e.filename or 'an input'}: {e.strerror or e}. Nothing "
                                     "was written.") from None
    except CheckFailed as e:  # the new version was refused at commit: the committed one and its partitions stay
        raise dg.Failure(description=str(e), metadata={"failed_checks": dg.MetadataValue.json(
            {n: v.to_dict() for n, v in e.failed.items()})}) from None
    except ValueError as e:  # an option out of its range (the parsers check theirs before reading)
        raise dg.Failure(description=f"{prefix}: {e}. Nothing was written.") from None
    metadata = report_metadata(report)
    metadata["version"] = report.version
    metadata["up_to_date"] = report.up_to_date
    if shards_of is not None:  # one partition of the download stage per raw shard
        added, removed = register_shards(context.instance, shards_of, len(report.shards))
        metadata["shard_partitions"] = dg.MetadataValue.text(
            f"{SHARDS[shards_of].name}: {len(report.shards)} partition(s) ({added} new, {removed} removed)")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(report.version))


#: what names an asset's input in its config (cc3m_wds: a folder; the others: files)
INPUT_FIELD = {"raw_cc3m_wds": "directory"}


def unconfigured_in_a_wider_run(context: dg.AssetExecutionContext, name: str) -> bool:
    """True when this raw asset has no input in the run's config but another raw asset of the same run has: the
    ingest job then ingests just the datasets its config names, and this one is skipped (not materialized, its
    committed version untouched). An asset run on its own without input still fails, saying what to set."""
    ops = (context.run.run_config or {}).get("ops") or {}

    def configured(asset: str) -> bool:
        cfg = (ops.get(asset) or {}).get("config") or {}
        return bool(cfg.get(INPUT_FIELD.get(asset, "paths")))

    others = [a for a in RAW_ASSET_NAMES if a != name and a in ops]
    if configured(name) or not any(configured(a) for a in others):
        return False
    context.log.info(f"{name}: no {INPUT_FIELD.get(name, 'paths')} in this run's config; skipped (the run ingests "
                     f"the datasets its config names: {', '.join(a for a in others if configured(a))})")
    return True


RAW_ASSET_NAMES = tuple(d.raw_asset for d in DATASETS.values())


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["cc3m_annotation_files"], output_required=False)
def raw_cc3m(context: dg.AssetExecutionContext, config: CC3MConfig, storage: StorageResource) -> Iterator[dg.MaterializeResult]:
    """CC3M from the official TSV (caption<TAB>url, with or without a header line), one row per image."""
    if unconfigured_in_a_wider_run(context, "raw_cc3m"):
        return
    paths = _paths("raw_cc3m", config.paths)
    yield _run(context, storage.get(), ingest_cc3m, paths, paths, "raw/cc3m", shards_of="cc3m",
                rows_per_shard=config.rows_per_shard, eval_sets=config.eval_sets,
                max_quarantine_rate=config.max_quarantine_rate, split=config.split)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["cc3m_wds_annotation_files"], output_required=False)
def raw_cc3m_wds(context: dg.AssetExecutionContext, config: CC3MWdsConfig, storage: StorageResource) -> Iterator[dg.MaterializeResult]:
    """CC3M from already-downloaded webdataset shards (pixparse/cc3m-wds layout): one partition of images_cc3m_wds
    (which adopts the images from the tars, no download) and captions_cc3m_wds per raw shard."""
    if unconfigured_in_a_wider_run(context, "raw_cc3m_wds"):
        return
    if not config.directory:
        raise dg.Failure("raw_cc3m_wds: config 'directory' is empty: name the folder of cc3m-{train,validation}-NNNN.tar "
                         "shards. Nothing was read or written.")
    try:
        files = list_shards(config.directory)
    except SourceFormatError as e:
        raise dg.Failure(description=str(e)) from None
    yield _run(context, storage.get(), ingest_cc3m_wds, config.directory, files, "raw/cc3m_wds", shards_of="cc3m_wds",
                rows_per_shard=config.rows_per_shard, eval_sets=config.eval_sets,
                max_quarantine_rate=config.max_quarantine_rate)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["webvid_annotation_files"], output_required=False)
def raw_webvid(context: dg.AssetExecutionContext, config: WebVidConfig, storage: StorageResource) -> Iterator[dg.MaterializeResult]:
    """WebVid-10M / 2M from the official CSV; duplicate videoids are counted and set aside. Videos already on disk
    (videos_dir, video2dataset_dir) are adopted by videos_webvid instead of downloaded."""
    if unconfigured_in_a_wider_run(context, "raw_webvid"):
        return
    paths = _paths("raw_webvid", config.paths)
    local = _local_media("raw_webvid", config.fetch_missing, config.videos_dir, config.video2dataset_dir,
                         **{k: v for k, v in (("videos_dir", config.videos_dir),
                                              ("video2dataset_dir", config.video2dataset_dir)) if v})
    yield _run(context, storage.get(), ingest_webvid, paths, paths, "raw/webvid", shards_of="webvid",
                rows_per_shard=config.rows_per_shard, eval_sets=config.eval_sets,
                max_quarantine_rate=config.max_quarantine_rate, split=config.split, **local)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["msrvtt_annotation_files"], output_required=False)
def raw_msrvtt(context: dg.AssetExecutionContext, config: MSRVTTConfig, storage: StorageResource) -> Iterator[dg.MaterializeResult]:
    """MSR-VTT from the videodatainfo JSON (or the flat caption list), one row per video with all its captions; the
    split scheme (official / 9k-1kA / 7k-1kA) from the split lists, and MSRVTT-QA on the videos' rows."""
    if unconfigured_in_a_wider_run(context, "raw_msrvtt"):
        return
    paths = _paths("raw_msrvtt", config.paths)
    try:
        check_scheme(config.split_scheme, config.train_list, config.test_list, paths)
        if config.mc_overlap not in MC_OVERLAP:
            raise ValueError(f"mc_overlap must be one of {', '.join(MC_OVERLAP)}, not {config.mc_overlap!r}")
    except ValueError as e:
        raise dg.Failure(f"raw_msrvtt: {e}. Nothing was read or written.") from None
    qa_paths = _expand(config.qa_paths) if config.qa_paths else []
    lists = [p for p in (config.train_list, config.test_list) if p]
    yield _run(context, storage.get(), ingest_msrvtt, paths, paths + lists + qa_paths, "raw/msrvtt",
                shards_of="msrvtt", rows_per_shard=config.rows_per_shard, eval_sets=config.eval_sets,
                max_quarantine_rate=config.max_quarantine_rate, videos_dir=config.videos_dir,
                split_scheme=config.split_scheme, train_list=config.train_list, test_list=config.test_list,
                qa_paths=qa_paths, **({"file_splits": dict(config.file_splits)} if config.file_splits else {}),
                **({"mc_overlap": config.mc_overlap} if config.mc_overlap != "training" else {}))


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["coco_annotation_files"], output_required=False)
def raw_coco(context: dg.AssetExecutionContext, config: COCOConfig, storage: StorageResource) -> Iterator[dg.MaterializeResult]:
    """COCO captions 2017, images joined with their ~5 captions, one row per image."""
    if unconfigured_in_a_wider_run(context, "raw_coco"):
        return
    paths = _paths("raw_coco", config.paths)
    yield _run(context, storage.get(), ingest_coco, paths, paths, "raw/coco", shards_of="coco",
                rows_per_shard=config.rows_per_shard, eval_sets=config.eval_sets,
                max_quarantine_rate=config.max_quarantine_rate, images_dir=config.images_dir)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=CODE_VERSION, deps=["internvid_annotation_files"], output_required=False)
def raw_internvid(context: dg.AssetExecutionContext, config: InternVidConfig, storage: StorageResource) -> Iterator[dg.MaterializeResult]:
    """InternVid-10M-FLT clips from the JSONL file, grouped per YouTube video, with optional score thresholds. Clips
    already cut (clips_dir) are adopted by videos_internvid instead of fetched."""
    if unconfigured_in_a_wider_run(context, "raw_internvid"):
        return
    paths = _paths("raw_internvid", config.paths)
    if config.clips_dir:
        try:
            check_clip_name_pattern(config.clip_name_pattern)
        except ValueError as e:
            raise dg.Failure(f"raw_internvid: {e}. Nothing was read or written.") from None
    local = _local_media("raw_internvid", config.fetch_missing, config.clips_dir, None,
                         **({"clips_dir": config.clips_dir, "clip_name_pattern": config.clip_name_pattern}
                            if config.clips_dir else {}))
    yield _run(context, storage.get(), ingest_internvid, paths, paths, "raw/internvid", shards_of="internvid",
                rows_per_shard=config.rows_per_shard, eval_sets=config.eval_sets,
                max_quarantine_rate=config.max_quarantine_rate, min_aesthetic_score=config.min_aesthetic_score,
                min_umt_score=config.min_umt_score, url_template=config.url_template, **local)


RAW_ASSETS = [raw_cc3m, raw_cc3m_wds, raw_webvid, raw_msrvtt, raw_coco, raw_internvid]
