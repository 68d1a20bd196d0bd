"""One export of one manifests version, committed like every other output.

An export's identity is the manifests version it reads, the format, its config and :data:`EXPORT_CODE_VERSION`:
exporting the same manifests again with the same config finds the committed export and writes nothing, and a new
manifests version gives a new export version (the older one stays until retention removes it). Its lineage
(``inputs``) is that manifests version and, in ``shared`` media mode, the extracted media versions its records
point at, so retention never removes a file an export names. Each export also carries ``export.json``: the
manifests version and location it came from, the counts per split and dataset, and what was skipped and why.

The media files an export's records point at.

None of the four consumers reads webdataset tars: VideoChat2, InternLM-XComposer2, InternVL and LLaVA /
Video-LLaVA all open one file per sample under a media root (``os.path.join(root, record path)`` or an absolute
path). So the media are written out as plain files, in one of two ways:

* **shared** (the default): each committed media shard's tar is extracted once into
  ``exports/media/<dataset>/<shard>/<version>/<key>.<ext>``, a committed output of its own whose identity is that
  media shard version. Every export, of every format and every manifests version, references these files instead
  of copying them; an export records the extracted versions it points at in its lineage, so retention keeps them as
  long as the export is kept. A new manifests version that reads the same media shards extracts nothing.
* **copy**: the files an export needs are copied into the export itself (``<export version>/media/...``), so the
  export directory is self-contained (to ship it to another cluster, say).

In both modes a record's path, relative to its media root, is ``<dataset>/<shard>/<version>/<key>.<ext>``.

Videos for a trainer that reads only pictures (InternVL; InternLM-XComposer-2.5 with ``ixc2_video: composite``)
are sampled once per media shard version and frame count into ``exports/media/frames/...`` (``n`` JPEG frames a
video) or ``exports/media/composite/...`` (one picture a video), committed outputs of their own under the same
media root, in the export's lineage like the extracted files (:mod:`mllm_pipeline.exports.pictures`).

Every export also holds ``locate.json`` and ``locate.py`` (:mod:`mllm_pipeline.exports.locate`): the files that
must carry absolute paths are written for the storage location (or the configured ``media_root`` /
``export_root``), and ``python locate.py --media-root DIR`` writes them again wherever the export was copied.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import tarfile
from pathlib import Path
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow.parquet as pq

from mllm_pipeline.exports import locate
from mllm_pipeline.exports.formats import DEFAULT_QA_INSTRUCTIONS, FORMATS, Context, internvl_image_tokens
from mllm_pipeline.exports.pictures import composite, jpeg, video_frames
from mllm_pipeline.storage import Storage, Version, identity_digest
from mllm_pipeline.vision.frames import VideoDecodeError

MEDIA_FILES_ROOT = "exports/media"
#: Bump when the extracted layout changes.
MEDIA_CODE_VERSION = "export-media-1"
_SIDE_FILES = ("txt", "json")


def tar_ref(media_tar: str) -> dict[str, str]:
    """``media/<ds>/<shard>/<version>/media.tar`` -> the media shard version it belongs to."""
    version_dir = posixpath.dirname(media_tar)
    return {"prefix": posixpath.dirname(version_dir), "version": posixpath.basename(version_dir)}


def files_prefix(media_tar: str) -> str:
    """Where the files of ``media_tar`` are extracted: ``exports/media/<dataset>/<shard>``."""
    prefix = tar_ref(media_tar)["prefix"]
    if not prefix.startswith("media/"):
        raise ValueError(f"not a media shard tar under media/: {media_tar!r}")
    return f"exports/{prefix}"


def ensure_media_files(storage: Storage, media_tars: Iterable[str], log: Any) -> dict[str, dict[str, Any]]:
    """The committed extraction of each tar in ``media_tars`` (extracting those that are not yet), by tar."""
    out: dict[str, dict[str, Any]] = {}
    for tar in sorted(set(media_tars)):
        ref = tar_ref(tar)
        prefix = files_prefix(tar)
        identity = media_identity(tar)
        done = storage.up_to_date(prefix, identity)
        if done is not None:
            out[tar] = done
            continue
        files, size = 0, 0
        with storage.new_version(prefix, identity, inputs=[ref]) as version:
            with storage.open(tar, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
                for member in tf:
                    if not member.isfile() or member.name.rsplit(".", 1)[-1] in _SIDE_FILES:
                        continue
                    data = tf.extractfile(member).read()
                    with storage.open(version.rel(member.name), "wb") as f:  # visible only on commit
                        f.write(data)
                    files += 1
                    size += len(data)
            out[tar] = version.commit({"kind": "export_media", "media": ref, "files": files, "bytes": size})
        log.info(f"extracted {files} media file(s) ({size / 1e6:.1f} MB) from {tar}")
    return out


def media_identity(media_tar: str) -> dict[str, Any]:
    return {"stage": "export_media", "code": MEDIA_CODE_VERSION, "media": tar_ref(media_tar)}


def shared_rel(media_tar: str, key: str, ext: str) -> str:
    """A sample's path relative to the media root (its extraction's version id follows from the media version)."""
    ref = tar_ref(media_tar)
    vid = "v-" + identity_digest(media_identity(media_tar))
    return f"{ref['prefix'][len('media/'):]}/{vid}/{key}.{ext}"


PICTURE_FORMS = ("frames", "composite")
#: Bump when the frames or the composite picture of a video change.
PICTURES_CODE_VERSION = "export-pictures-1"
PICTURES_INDEX = "pictures.json"


def pictures_prefix(media_tar: str, form: str) -> str:
    """``exports/media/<form>/<dataset>/<shard>``: where the pictures of the videos in ``media_tar`` go."""
    return f"{MEDIA_FILES_ROOT}/{form}/{tar_ref(media_tar)['prefix'][len('media/'):]}"


def pictures_identity(media_tar: str, form: str, frames: int) -> dict[str, Any]:
    return {"stage": "export_pictures", "code": PICTURES_CODE_VERSION, "media": tar_ref(media_tar), "form": form,
            "frames": frames}


def ensure_video_pictures(storage: Storage, media_tars: Iterable[str], form: str, frames: int,
                          log: Any) -> dict[str, dict[str, Any]]:
    """The committed pictures (``form``: ``frames`` or ``composite``) of every video in ``media_tars``, sampling
    those not yet done; by tar. Each version's ``pictures.json`` maps a member key to its pictures' paths relative
    to the media root (``[]`` for a video that does not decode, with the reason under ``failed``)."""
    if form not in PICTURE_FORMS:
        raise ValueError(f"form must be one of {PICTURE_FORMS}, not {form!r}")
    out: dict[str, dict[str, Any]] = {}
    for tar in sorted(set(media_tars)):
        prefix = pictures_prefix(tar, form)
        identity = pictures_identity(tar, form, frames)
        done = storage.up_to_date(prefix, identity)
        if done is not None:
            out[tar] = done
            continue
        index: dict[str, list[str]] = {}
        failed: dict[str, str] = {}
        size = 0
        with storage.new_version(prefix, identity, inputs=[tar_ref(tar)]) as version:
            base = f"{prefix[len(MEDIA_FILES_ROOT) + 1:]}/{version.id}"
            with storage.open(tar, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
                for member in tf:
                    if not member.isfile() or member.name.rsplit(".", 1)[-1] in _SIDE_FILES:
                        continue
                    key = member.name.rsplit(".", 1)[0]
                    try:
                        pics = video_frames(tf.extractfile(member).read(), frames, name=f"{tar}:{member.name}")
                    except VideoDecodeError as e:
                        index[key], failed[key] = [], str(e)
                        continue
                    named = ([(f"{key}/{i + 1:02d}.jpg", p) for i, p in enumerate(pics)] if form == "frames"
                             else [(f"{key}.jpg", composite(pics))])
                    for name, pic in named:
                        data = jpeg(pic)
                        with storage.open(version.rel(name), "wb") as f:
                            f.write(data)
                        size += len(data)
                    index[key] = [f"{base}/{name}" for name, _ in named]
            storage.write_json(version.rel(PICTURES_INDEX), {"pictures": index, "failed": failed})
            out[tar] = version.commit({"kind": "export_pictures", "media": tar_ref(tar), "form": form,
                                       "frames": frames, "videos": len(index), "failed": len(failed), "bytes": size})
        log.info(f"{form}: {len(index) - len(failed)} video(s) of {tar} as pictures ({size / 1e6:.1f} MB)"
                 + (f", {len(failed)} that do not decode" if failed else ""))
    return out


def copy_media(storage: Storage, version: Version, wanted: dict[str, dict[str, str]], log: Any) -> tuple[int, int]:
    """Copy into ``version``'s ``media/`` the members named in ``wanted`` (tar -> {member name: relative path});
    returns (files, bytes). Each tar is read once, front to back."""
    files, size = 0, 0
    for tar, names in sorted(wanted.items()):
        found = 0
        with storage.open(tar, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
            for member in tf:
                rel = names.get(member.name)
                if rel is None or not member.isfile():
                    continue
                data = tf.extractfile(member).read()
                with storage.open(version.rel(f"media/{rel}"), "wb") as f:
                    f.write(data)
                found += 1
                size += len(data)
        if found != len(names):
            raise RuntimeError(f"{len(names) - found} media file(s) the manifests name are missing from {tar}")
        files += found
    log.info(f"copied {files} media file(s) ({size / 1e6:.1f} MB) into the export")
    return files, size


#: Bump when what an export holds for the same manifests and config changes.
EXPORT_CODE_VERSION = "exports-2"
MANIFESTS = "manifests"
SPLITS = ("train", "val", "test")
COLUMNS = ["id", "sample_id", "dataset", "split", "media_kind", "media_tar", "media_key", "media_ext", "width",
           "height", "caption", "conversations"]
MEDIA_MODES = ("shared", "copy")
IXC2_VIDEO = ("skip", "composite")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    media: str = "shared"  # shared: files extracted once per media shard, referenced; copy: into the export
    media_root: str = ""  # where the consumer sees the media root (default: its location on the storage root)
    export_root: str = ""  # where the consumer sees this export's directory (default: its location)
    splits: tuple[str, ...] = SPLITS
    qa_image_instruction: str = DEFAULT_QA_INSTRUCTIONS["image"]
    qa_video_instruction: str = DEFAULT_QA_INSTRUCTIONS["video"]
    video_frames: int = 8  # frames per video for the trainers that read pictures (InternVL; IXC-2.5 composite)
    internvl_max_dynamic_patch: int = 6  # InternVL's --max_dynamic_patch (its 2.5 finetune scripts: 6)
    internvl_max_seq_length: int = 8192  # InternVL's --max_seq_length (its finetune scripts: 8192)
    ixc2_video: str = "skip"  # skip: the 2 / 4KHD finetune reads no video; composite: one picture (IXC-2.5)

    def __post_init__(self) -> None:
        if self.media not in MEDIA_MODES:
            raise ValueError(f"media must be one of {MEDIA_MODES}, not {self.media!r}")
        bad = sorted(set(self.splits) - set(SPLITS))
        if bad or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {list(self.splits)}")
        if self.ixc2_video not in IXC2_VIDEO:
            raise ValueError(f"ixc2_video must be one of {IXC2_VIDEO}, not {self.ixc2_video!r}")
        if not 1 <= self.video_frames <= 64:
            raise ValueError(f"video_frames must be 1..64, got {self.video_frames}")
        if self.internvl_max_dynamic_patch < 1:
            raise ValueError(f"internvl_max_dynamic_patch must be at least 1, got {self.internvl_max_dynamic_patch}")
        need = internvl_image_tokens(self.video_frames, self.internvl_max_dynamic_patch)
        if need > self.internvl_max_seq_length // 2:
            raise ValueError(
                f"video_frames {self.video_frames} give up to {need} image tokens in InternVL, more than half its "
                f"max_seq_length {self.internvl_max_seq_length}: lower video_frames (8 frames take 2,048 tokens at "
                "max_dynamic_patch 6) or raise internvl_max_seq_length to what the trainer is run with")


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


def _manifest_tars(storage: Storage, base: str, splits: Iterable[str]) -> tuple[set[str], set[str]]:
    """(every media tar, the tars of video rows) the manifest splits under ``base`` read."""
    tars: set[str] = set()
    video: set[str] = set()
    for split in splits:
        with storage.open(f"{base}/{split}.parquet") as f:
            t = pq.read_table(f, columns=["media_tar", "media_kind"])
        for tar, kind in zip(t["media_tar"].to_pylist(), t["media_kind"].to_pylist()):
            tars.add(tar)
            if kind == "video":
                video.add(tar)
    return tars, video


def _relative(from_dir: str, to_dir: str) -> str:
    return posixpath.relpath(to_dir, from_dir)


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
    tars, video_tars = _manifest_tars(storage, base, splits)
    fmt_obj = FORMATS[fmt]()
    form = fmt_obj.video_form_for(config)
    pictures = ensure_video_pictures(storage, video_tars, form, config.video_frames, log) if form and video_tars else {}
    picture_index = {tar: storage.read_json(f"{m['prefix']}/{m['version']}/{PICTURES_INDEX}")["pictures"]
                     for tar, m in pictures.items()}
    media_refs: list[dict[str, str]] = []
    if config.media == "shared":
        for tar, m in ensure_media_files(storage, tars, log).items():
            if m["version"] != "v-" + identity_digest(media_identity(tar)):
                raise RuntimeError(f"the extracted media of {tar} has an unexpected version {m['version']}")
            media_refs.append({"prefix": m["prefix"], "version": m["version"]})
        media_refs += [{"prefix": m["prefix"], "version": m["version"]} for m in pictures.values()]
    mcfg = man.get("summary", {}).get("config", {})
    caption_instructions = set(mcfg.get("image_instructions") or []) | set(mcfg.get("video_instructions") or [])
    counts: Counter = Counter()
    skipped: Counter = Counter()
    examples: list[dict[str, Any]] = []
    wanted: dict[str, dict[str, str]] = {}
    wanted_pictures: set[str] = set()
    with storage.new_version(prefix, identity, inputs=[ref, *media_refs]) as version:
        export_dir = f"{prefix}/{version.id}"
        export_root = config.export_root or storage.uri(export_dir)
        media_dir = MEDIA_FILES_ROOT if config.media == "shared" else version.rel("media")
        media_root = config.media_root or storage.uri(media_dir)
        ctx = Context(media_root, export_root, caption_instructions,
                      {"image": config.qa_image_instruction, "video": config.qa_video_instruction},
                      lambda rel: storage.open(version.rel(rel), "wb"), options=config)
        for split in splits:
            with storage.open(f"{base}/{split}.parquet") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=COLUMNS):
                    for row in batch.to_pylist():
                        row["rel"] = shared_rel(row["media_tar"], row["media_key"], row["media_ext"])
                        row["turns"] = json.loads(row["conversations"])
                        pics: list[str] = []
                        if form and row["media_kind"] == "video":
                            pics = picture_index[row["media_tar"]].get(row["media_key"]) or []
                            if form == "frames":
                                row["frames"] = pics
                            else:
                                row["composite"] = pics[0] if pics else None
                        why = fmt_obj.add(ctx, split, row)
                        if why is None:
                            counts[(split, row["dataset"])] += 1
                            if len(examples) < 6:
                                examples.append({"split": split, "dataset": row["dataset"], "id": row["id"],
                                                 "media": row["rel"], "text": row["caption"]})
                            if config.media == "copy":
                                wanted.setdefault(row["media_tar"], {})[f"{row['media_key']}.{row['media_ext']}"] = row["rel"]
                                wanted_pictures.update(pics)
                        else:
                            skipped[(split, row["dataset"], row["media_kind"], why)] += 1
        files = ctx.close()
        bound = fmt_obj.bound(ctx, files)
        for entry in bound:
            if entry["kind"] != "ixc2_records":
                with storage.open(version.rel(entry["path"]), "wb") as f:
                    f.write(locate.RENDER[entry["kind"]](entry, export_root, media_root).encode())
                files.setdefault(entry["path"], None)
        spec = {"spec": locate.SPEC_VERSION, "format": fmt, "media_root": media_root.rstrip("/"),
                "export_root": export_root.rstrip("/"),
                "media_rel": _relative(export_dir, MEDIA_FILES_ROOT) if config.media == "shared" else "media",
                "bound": bound, "relative_records": fmt_obj.relative_records({r: n for r, n in files.items() if n is not None}),
                "files": sorted(files), **fmt_obj.spec_extra(config)}
        with storage.open(version.rel(locate.LOCATE_FILE), "wb") as f:
            f.write(json.dumps(spec, indent=2).encode())
        with storage.open(version.rel("locate.py"), "wb") as f:
            f.write(Path(locate.__file__).read_bytes())
        copied = copy_media(storage, version, wanted, log) if config.media == "copy" else (0, 0)
        if wanted_pictures:
            for rel in sorted(wanted_pictures):
                with storage.open(f"{MEDIA_FILES_ROOT}/{rel}", "rb") as src, storage.open(version.rel(f"media/{rel}"), "wb") as dst:
                    data = src.read()
                    dst.write(data)
                copied = (copied[0] + 1, copied[1] + len(data))
        summary = {
            "format": fmt, "consumer": FORMATS[fmt].consumer, "manifests_version": man["version"],
            "manifests_location": man.get("location"), "media": config.media, "media_root": media_root,
            "export_root": export_root,
            "records": [{"split": s, "dataset": d, "records": n} for (s, d), n in sorted(counts.items())],
            "skipped": [{"split": s, "dataset": d, "media_kind": k, "rows": n, "why": why}
                        for (s, d, k, why), n in sorted(skipped.items())],
            "left_out": [{"note": note, "rows": n} for note, n in sorted(ctx.notes.items())],
            "files": files, "examples": examples, "copied_files": copied[0], "copied_bytes": copied[1],
            "media_shards": len(tars), "video_pictures": form, "video_frames": config.video_frames if form else None,
            "usage": locate.usage(spec, export_root, media_root),
        }
        with storage.open(version.rel("export.json"), "wb") as f:
            f.write(json.dumps(summary, indent=2).encode())
        committed = version.commit({"kind": "export", "format": fmt, "manifests_version": man["version"],
                                    "summary": summary})
    log.info(f"{prefix}: {sum(counts.values())} record(s) from manifests {man['version']} -> {committed['location']}"
             + (f"; {sum(skipped.values())} row(s) skipped" if skipped else ""))
    return committed, False


def extract_manifests_media(storage: Storage, manifests: str | None, log: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``export_media`` stage: extract every media shard a manifests version reads (the current one, or
    ``manifests``), once per media shard version. Returns that manifests version's manifest and one row per media
    shard (``shard``, ``version``, ``files``, ``MB``, ``extracted_now``)."""
    man = manifests_version(storage, manifests)
    base = f"{MANIFESTS}/{man['version']}"
    tars, _ = _manifest_tars(storage, base, [s for s in SPLITS if storage.exists(f"{base}/{s}.parquet")])
    before = {t for t in tars if storage.committed_version(files_prefix(t), "v-" + identity_digest(media_identity(t)))}
    files = ensure_media_files(storage, tars, log)
    if tars and not tars - before:
        log.info(f"up to date: the {len(tars)} media shard(s) of manifests {man['version']} are already extracted")
    rows = [{"shard": m["prefix"][len(MEDIA_FILES_ROOT) + 1:], "version": m["version"], "files": m["files"],
             "MB": round(m["bytes"] / 1e6, 2), "extracted_now": t not in before} for t, m in sorted(files.items())]
    return man, rows
