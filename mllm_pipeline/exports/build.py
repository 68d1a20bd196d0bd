"""One export of one manifests version, committed like every other output.

An export's identity is the manifests version it reads, the format, its config and :data:`EXPORT_CODE_VERSION`:
exporting the same manifests again with the same config finds the committed export and writes nothing, and a new
manifests version gives a new export version (the older one stays until retention removes it). Its lineage
(``inputs``) is that manifests version and, in ``shared`` media mode, the extracted media versions its records
point at, so retention never removes a file an export names. Each export also carries ``export.json``: the
manifests version and location it came from, the counts per split and dataset, and what was skipped and why.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from mllm_pipeline.exports.formats import DEFAULT_QA_INSTRUCTIONS, FORMATS, Context
from mllm_pipeline.exports.media import MEDIA_FILES_ROOT, copy_media, ensure_media_files, media_identity, shared_rel
from mllm_pipeline.storage import Storage, identity_digest

#: Bump when what an export holds for the same manifests and config changes.
EXPORT_CODE_VERSION = "exports-1"
MANIFESTS = "manifests"
SPLITS = ("train", "val", "test")
COLUMNS = ["id", "sample_id", "dataset", "split", "media_kind", "media_tar", "media_key", "media_ext", "width",
           "height", "caption", "conversations"]
MEDIA_MODES = ("shared", "copy")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    media: str = "shared"  # shared: files extracted once per media shard, referenced; copy: into the export
    media_root: str = ""  # where the consumer sees the media root (default: its location on the storage root)
    export_root: str = ""  # where the consumer sees this export's directory (default: its location)
    splits: tuple[str, ...] = SPLITS
    qa_image_instruction: str = DEFAULT_QA_INSTRUCTIONS["image"]
    qa_video_instruction: str = DEFAULT_QA_INSTRUCTIONS["video"]

    def __post_init__(self) -> None:
        if self.media not in MEDIA_MODES:
            raise ValueError(f"media must be one of {MEDIA_MODES}, not {self.media!r}")
        bad = sorted(set(self.splits) - set(SPLITS))
        if bad or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {list(self.splits)}")


def export_prefix(fmt: str) -> str:
    return f"exports/{fmt}"


def manifests_version(storage: Storage, version: str | None = None) -> dict[str, Any]:
    """The committed manifests (the current version, or ``version``)."""
    if version is None:
        return storage.read_manifest(MANIFESTS)
    m = storage.committed_version(MANIFESTS, version)
    if m is None:
        raise FileNotFoundError(f"{storage.uri(MANIFESTS)}/{version} is not a committed manifests version")
    return m


def build_export(storage: Storage, fmt: str, config: ExportConfig, log: Any,
                 manifests: str | None = None) -> tuple[dict[str, Any], bool]:
    """Write (or find up to date) the ``fmt`` export of the manifests version ``manifests`` (default: current).
    Returns the committed export's manifest and whether it was already up to date."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {sorted(FORMATS)}")
    man = manifests_version(storage, manifests)
    ref = {"prefix": MANIFESTS, "version": man["version"]}
    prefix = export_prefix(fmt)
    identity = {"stage": "export", "format": fmt, "code": EXPORT_CODE_VERSION, "manifests": ref,
                "config": dataclasses.asdict(config)}
    done = storage.up_to_date(prefix, identity)
    if done is not None:
        log.info(f"{prefix} up to date: {done['version']} was exported from {ref['version']} with this config")
        return done, True
    base = f"{MANIFESTS}/{man['version']}"
    splits = [s for s in config.splits if storage.exists(f"{base}/{s}.parquet")]
    tars: set[str] = set()
    for split in splits:
        with storage.open(f"{base}/{split}.parquet") as f:
            tars |= set(pq.read_table(f, columns=["media_tar"])["media_tar"].to_pylist())
    media_refs: list[dict[str, str]] = []
    if config.media == "shared":
        for tar, m in ensure_media_files(storage, tars, log).items():
            if m["version"] != "v-" + identity_digest(media_identity(tar)):
                raise RuntimeError(f"the extracted media of {tar} has an unexpected version {m['version']}")
            media_refs.append({"prefix": m["prefix"], "version": m["version"]})
    mcfg = man.get("summary", {}).get("config", {})
    caption_instructions = set(mcfg.get("image_instructions") or []) | set(mcfg.get("video_instructions") or [])
    fmt_obj = FORMATS[fmt]()
    counts: Counter = Counter()
    skipped: Counter = Counter()
    examples: list[dict[str, Any]] = []
    wanted: dict[str, dict[str, str]] = {}
    with storage.new_version(prefix, identity, inputs=[ref, *media_refs]) as version:
        export_root = config.export_root or storage.uri(f"{prefix}/{version.id}")
        media_root = config.media_root or storage.uri(MEDIA_FILES_ROOT if config.media == "shared" else version.rel("media"))
        ctx = Context(media_root, export_root, caption_instructions,
                      {"image": config.qa_image_instruction, "video": config.qa_video_instruction},
                      lambda rel: storage.open(version.rel(rel), "wb"))
        for split in splits:
            with storage.open(f"{base}/{split}.parquet") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=COLUMNS):
                    for row in batch.to_pylist():
                        row["rel"] = shared_rel(row["media_tar"], row["media_key"], row["media_ext"])
                        row["turns"] = json.loads(row["conversations"])
                        if fmt_obj.add(ctx, split, row):
                            counts[(split, row["dataset"])] += 1
                            if len(examples) < 6:
                                examples.append({"split": split, "dataset": row["dataset"], "id": row["id"],
                                                 "media": row["rel"], "text": row["caption"]})
                            if config.media == "copy":
                                wanted.setdefault(row["media_tar"], {})[f"{row['media_key']}.{row['media_ext']}"] = row["rel"]
                        else:
                            skipped[(split, row["dataset"], row["media_kind"])] += 1
        files = ctx.close()
        for rel, text in fmt_obj.finish(ctx, files).items():
            with storage.open(version.rel(rel), "wb") as f:
                f.write(text.encode())
            files.setdefault(rel, None)
        copied = copy_media(storage, version, wanted, log) if config.media == "copy" else (0, 0)
        summary = {
            "format": fmt, "consumer": FORMATS[fmt].consumer, "manifests_version": man["version"],
            "manifests_location": man.get("location"), "media": config.media, "media_root": media_root,
            "export_root": export_root,
            "records": [{"split": s, "dataset": d, "records": n} for (s, d), n in sorted(counts.items())],
            "skipped": [{"split": s, "dataset": d, "media_kind": k, "rows": n,
                         "why": f"{FORMATS[fmt].consumer} reads no {k}"} for (s, d, k), n in sorted(skipped.items())],
            "files": files, "examples": examples, "copied_files": copied[0], "copied_bytes": copied[1],
            "media_shards": len(tars), "usage": fmt_obj.usage(export_root, media_root, files),
        }
        with storage.open(version.rel("export.json"), "wb") as f:
            f.write(json.dumps(summary, indent=2).encode())
        committed = version.commit({"kind": "export", "format": fmt, "manifests_version": man["version"],
                                    "summary": summary})
    log.info(f"{prefix}: {sum(counts.values())} record(s) from manifests {man['version']} -> {committed['location']}")
    return committed, False
