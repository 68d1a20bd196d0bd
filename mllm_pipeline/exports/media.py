"""The media files an export's records point at.

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
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterable
from typing import Any

from mllm_pipeline.storage import Storage, Version, identity_digest

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
