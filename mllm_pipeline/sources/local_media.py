"""Media you already have, for sources whose annotation names URLs: found at ingest, adopted by the media stage.

A raw row whose media is on disk gets ``path`` (where it is) and keeps its ``url`` (where it came from); the media
stage reads a row's ``path`` first and never requests its URL (:func:`mllm_pipeline.download.videos.fetch_videos`).
Two layouts are indexed:

* **a folder of files** (:meth:`LocalMedia.folder`): every file under it, by its path relative to the folder
  (``1053841541.mp4``, ``yt1_00:00:01.000_00:00:04.000.mp4``, ``sub/dir/name.mp4``); a row is found when the name
  it expects is there. The row's ``path`` is ``<folder>/<name>``.
* **an earlier video2dataset output** (:meth:`LocalMedia.video2dataset`): its webdataset tars ``00000.tar`` ...
  (the parquet and ``_stats.json`` files beside them are not read). video2dataset 1.3's
  ``WebDatasetSampleWriter`` writes each sample as ``<key>.json`` (the input row's saved columns, e.g. WebVid's
  ``videoid``, ``page_idx``, ``page_dir``, ``duration`` with ``--save_additional_columns``, then ``caption``, ``url``,
  ``key``, ``status``, ``error_message``, ``yt_meta_dict``), ``<key>.mp4`` and ``<key>.txt``; a sample that failed
  to download is written too, as ``.json`` + ``.txt`` only, with ``status: failed_to_download``. A sample is found
  when it has its ``.mp4`` member (and its status, if any, is ``success``); the row's ``path`` is
  ``tar://<key>.mp4::<tar path>``, the convention of :mod:`mllm_pipeline.download.adopt`. Only tar headers and the
  small ``.json`` members are read (the tar is read with seeks, never the video bytes). When one id is in several
  tars, the first (in file-name order) is used.

Both indexes hold 64-bit hashes of the names in a sorted array (plus, for tars, the member names): about 8 bytes a
file (24 in tars), so the 10M videos of WebVid cost 80-240 MB, and rows are looked up a block at a time. :func:`listing_digest` is what a raw version's
identity records of the local media (folder: the names; tars: names and sizes), so a re-run with nothing changed is
up to date and adding files re-ingests.
"""

from __future__ import annotations

import json
import os
import string
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.sources.common import SourceFormatError
from mllm_pipeline.storage import filesystem_for, is_local

#: The video2dataset json field that holds WebVid's id (``--save_additional_columns='[videoid,...]'``).
V2D_ID_FIELD = "videoid"


def _hashes(names: Iterable[str | None]) -> np.ndarray:
    import xxhash

    return np.fromiter((xxhash.xxh3_64_intdigest(n.encode()) if n is not None else 0 for n in names), dtype=np.uint64)


def _walk(directory: str) -> Iterator[str]:
    """The relative paths ("/"-separated) of every file under ``directory``; SourceFormatError if it is not one."""
    fs, root = filesystem_for(directory)
    if is_local(directory):
        root = root.rstrip("/") or "/"
        if not os.path.isdir(root):
            raise SourceFormatError(directory, "a directory of media files", "no such directory")
        for dirpath, _dirs, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for f in files:
                yield prefix + f
        return
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise SourceFormatError(directory, "a directory of media files", "no such directory")
    for p in fs.find(root):
        yield p[len(root) + 1:]


def video2dataset_tars(directory: str) -> list[tuple[str, int]]:
    """(path, size) of the ``*.tar`` files of a video2dataset output folder, in name order."""
    fs, root = filesystem_for(directory)
    try:
        entries = fs.ls(root.rstrip("/"), detail=True)
    except FileNotFoundError:
        raise SourceFormatError(directory, "a video2dataset output folder (00000.tar, 00001.tar ...)", "no such directory") from None
    tars = sorted((e["name"].rstrip("/").rsplit("/", 1)[-1], int(e.get("size") or 0)) for e in entries
                  if e.get("type") == "file" and e["name"].endswith(".tar"))
    if not tars:
        names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries)
        raise SourceFormatError(directory, "a video2dataset output folder of webdataset tars (00000.tar ...)",
                                f"{len(names)} file(s), no .tar" + (f" (e.g. {names[0]!r})" if names else ""))
    return [(f"{directory.rstrip('/')}/{name}", size) for name, size in tars]


class LocalMedia:
    """Where the media of a set of names are: ``find(names)`` gives each name's ``path``, or null."""

    def __init__(self, what: str, hashes: np.ndarray, prefix: str = "", members: pa.Array | None = None,
                 tar_index: np.ndarray | None = None, tars: list[str] | None = None):
        order = np.argsort(hashes, kind="stable")  # stable: of equal names, the first listed is found
        self.what, self.prefix = what, prefix
        self.hashes = hashes[order]
        self._members = members.take(pa.array(order)) if members is not None else None
        self._tar_index = tar_index[order] if tar_index is not None else None
        self._tars = tars
        self.digest = _digest(self.hashes)

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def folder(cls, directory: str) -> LocalMedia:
        """Every file under ``directory``, found by its relative path."""
        return cls(f"videos under {directory}", _hashes(_walk(directory)), prefix=directory.rstrip("/") + "/")

    @classmethod
    def video2dataset(cls, directory: str, id_field: str = V2D_ID_FIELD) -> LocalMedia:
        """The successful samples of a video2dataset output, found by the json's ``id_field`` (as text; integers
        as their decimal digits)."""
        hashes: list[np.ndarray] = []
        members: list[pa.Array] = []
        tar_index: list[np.ndarray] = []
        tars = [p for p, _ in video2dataset_tars(directory)]
        for i, tar in enumerate(tars):
            found = list(_v2d_samples(tar, id_field))
            hashes.append(_hashes(k for k, _ in found))
            members.append(pa.array([m for _, m in found], pa.string()))
            tar_index.append(np.full(len(found), i, dtype=np.int32))
        return cls(f"video2dataset samples in {directory}",
                   np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
                   members=pa.concat_arrays(members) if members else pa.array([], pa.string()),
                   tar_index=np.concatenate(tar_index) if tar_index else np.zeros(0, np.int32), tars=tars)

    def find(self, names: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The ``path`` of each name's media (null where it is not there, or the name is null)."""
        if isinstance(names, pa.ChunkedArray):
            names = names.combine_chunks()
        n = len(names)
        if n == 0 or len(self.hashes) == 0:
            return pa.nulls(n, pa.string())
        h = _hashes(names.to_pylist())
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        found = (self.hashes[pos] == h) & np.asarray(pc.is_valid(names))
        mask = pa.array(found)
        if self._members is None:
            return pc.if_else(mask, pc.binary_join_element_wise(self.prefix, names, ""), pa.scalar(None, pa.string()))
        hit = np.flatnonzero(found)
        out = np.full(n, None, dtype=object)
        members = self._members.take(pa.array(pos[hit])).to_pylist()
        for j, m, t in zip(hit, members, self._tar_index[pos[hit]]):
            out[j] = f"tar://{m}::{self._tars[t]}"
        return pa.array(out, pa.string())


def _v2d_samples(tar: str, id_field: str) -> Iterator[tuple[str, str]]:
    """(id, mp4 member name) of each successful sample of one video2dataset tar, reading headers and json only."""
    fs, path = filesystem_for(tar)
    current, meta, mp4 = None, None, None

    def done() -> tuple[str, str] | None:
        if mp4 is None or not isinstance(meta, dict) or meta.get("status", "success") != "success":
            return None
        vid = meta.get(id_field)
        if isinstance(vid, bool) or not isinstance(vid, (int, str)) or str(vid).strip() == "":
            return None
        return str(vid).strip(), mp4

    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, _, ext = info.name.rpartition(".")
                if key != current:
                    if (hit := done()) is not None:
                        yield hit
                    current, meta, mp4 = key, None, None
                if ext == "json":
                    try:
                        meta = json.loads(tf.extractfile(info).read())
                    except (ValueError, UnicodeDecodeError):
                        meta = None
                elif ext == "mp4":
                    mp4 = info.name
    except (tarfile.TarError, OSError):
        # a tar cut short (a run that was killed): the samples before the damage are indexed; one whose bytes are
        # cut is found here and counted as a failure (decode_error / truncated) when the media stage reads it
        pass
    if (hit := done()) is not None:
        yield hit


def _digest(sorted_hashes: np.ndarray) -> str:
    import xxhash

    return xxhash.xxh3_128(sorted_hashes.tobytes()).hexdigest()


# a folder's index is built once per run: listing_digest builds it for the raw version's identity, the parser
# takes it back (same process) instead of listing the folder again
_RECENT: dict[str, LocalMedia] = {}


def listing_digest(folder: str | None = None, video2dataset_dir: str | None = None) -> str:
    """What a raw version records of the local media: the names of the folder's files, and the names and sizes of
    the video2dataset tars. Raises SourceFormatError for a folder that does not exist."""
    import xxhash

    h = xxhash.xxh3_128()
    if folder:
        index = LocalMedia.folder(folder)
        _RECENT.clear()
        _RECENT[folder] = index
        h.update(f"folder|{len(index)}|{index.digest}|".encode())
    if video2dataset_dir:
        h.update(json.dumps(["video2dataset", video2dataset_tars(video2dataset_dir)]).encode())
    return h.hexdigest()


def folder_index(folder: str) -> LocalMedia:
    """The index of ``folder``: the one :func:`listing_digest` just built, else a new one."""
    return _RECENT.pop(folder, None) or LocalMedia.folder(folder)


# -- file names made from a row's fields ----------------------------------------------------------------------

def name_fields(pattern: str) -> list[tuple[str, str | None]]:
    """``pattern`` as (literal, field or None) pieces; ValueError for format specs, conversions or bad braces."""
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as e:
        raise ValueError(f"bad file name pattern {pattern!r}: {e}") from None
    out = []
    for literal, field, spec, conversion in parsed:
        if field is not None and (spec or conversion or not field.isidentifier()):
            raise ValueError(f"bad file name pattern {pattern!r}: write fields as plain {{name}}, got {{{field}"
                             f"{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}")
        out.append((literal, field))
    return out


def format_names(pattern: str, columns: dict[str, Any]) -> pa.Array:
    """``pattern`` filled in row by row from ``columns`` (string arrays, by field name), vectorised."""
    pieces: list[Any] = []
    for literal, field in name_fields(pattern):
        if literal:
            pieces.append(literal)
        if field is not None:
            pieces.append(columns[field])
    if not any(not isinstance(p, str) for p in pieces):
        raise ValueError(f"bad file name pattern {pattern!r}: it names no field")
    return pc.binary_join_element_wise(*pieces, "")


def on_disk_reasons(reason: Any, media_path: Any, fetch_missing: bool) -> tuple[Any, int, int]:
    """For rows not set aside (``reason`` null): how many found their medium on disk and how many did not; with
    ``fetch_missing`` false the missing ones get the reason ``media_file_missing``. Returns (reason, on disk,
    not on disk)."""
    kept = pc.is_null(reason)
    missing = pc.and_(kept, pc.is_null(media_path))
    found = pc.sum(pc.and_(kept, pc.is_valid(media_path))).as_py() or 0
    not_found = pc.sum(missing).as_py() or 0
    if not fetch_missing:
        reason = pc.if_else(missing, pa.scalar("media_file_missing"), reason)
    return reason, found, not_found
