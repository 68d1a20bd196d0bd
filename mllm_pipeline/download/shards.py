"""Media shards under the storage root: one webdataset tar and one status table per raw shard, versioned.

Layout (``<prefix>`` is ``media/<dataset>/<shard key>``)::

    <prefix>/_manifest.json              written last: the shard is trusted only once this exists
    <prefix>/<version>/media.tar          webdataset: <key>.<ext> (the media), <key>.txt (first caption),
                                          <key>.json (sample id, all captions, source, sizes, clip times)
    <prefix>/<version>/samples.parquet    one row per raw row: success, or failed with its reason

Keys are ``<shard number>_<row number>`` (``00003_00017``): built from positions, never from a URL or an id in the
annotation file, so no untrusted string reaches a file name, and a retried sample keeps its key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_pipeline.download.accounting import STATUS_SCHEMA, SUCCESS, summarize
from mllm_pipeline.storage import Storage, Version

TAR_NAME = "media.tar"
STATUS_NAME = "samples.parquet"
RAW_COLUMNS = ["sample_id", "url", "path", "captions", "group_id", "clip_start_s", "clip_end_s", "duration_s", "split"]


def shard_key(index: int) -> str:
    """The key of raw shard ``index`` (also its Dagster partition key): ``shard-00000``, ``shard-00001`` ..."""
    return f"shard-{index:05d}"


def shard_index(key: str) -> int:
    if not key.startswith("shard-") or not key[6:].isdigit():
        raise ValueError(f"not a shard key: {key!r} (expected shard-NNNNN)")
    return int(key[6:])


def media_prefix(dataset: str, shard_key: str) -> str:
    return f"media/{dataset}/{shard_key}"


def sample_key(shard_index: int, row: int) -> str:
    return f"{shard_index:05d}_{row:05d}"


def options_digest(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_raw_rows(storage_or_uri: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of one raw shard (any fsspec URI), with a ``row`` column holding each row's position."""
    from mllm_pipeline.storage import filesystem_for

    fs, path = filesystem_for(storage_or_uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    cols = [c for c in (columns or RAW_COLUMNS) if c in table.column_names]
    table = table.select(cols)
    return table.append_column("row", pa.array(range(table.num_rows), pa.int32()))


@dataclasses.dataclass
class Previous:
    """The committed version of a media shard, if any."""

    manifest: dict[str, Any]
    status: pa.Table

    @classmethod
    def load(cls, storage: Storage, prefix: str) -> Previous | None:
        if not storage.exists(f"{prefix}/_manifest.json"):
            return None
        manifest = storage.read_manifest(prefix)
        with storage.open(f"{prefix}/{manifest['version']}/{STATUS_NAME}") as f:
            status = pq.read_table(f)
        return cls(manifest, status)

    def tar_rel(self) -> str:
        return f"{self.manifest['prefix']}/{self.manifest['version']}/{TAR_NAME}"


class MediaShardWriter:
    """Streams ``media.tar`` into a new version; ``close`` writes the status table; the caller commits."""

    def __init__(self, storage: Storage, version: Version):
        self.storage = storage
        self.version = version
        self._raw = storage.open(version.rel(TAR_NAME), "wb")
        self._tar = tarfile.open(fileobj=self._raw, mode="w|", format=tarfile.USTAR_FORMAT)
        self.keys: set[str] = set()
        self.bytes = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        if key in self.keys:
            raise RuntimeError(f"sample key {key} written twice into {self.version.rel(TAR_NAME)}")
        self.keys.add(key)
        now = int(time.time())
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)

    def copy_from(self, storage: Storage, tar_rel: str, keys: set[str]) -> int:
        """Copy the members of ``keys`` from an earlier version's tar (a retry keeps what already succeeded)."""
        copied: set[str] = set()
        with storage.open(tar_rel, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as src:
            for member in src:
                key = member.name.split(".", 1)[0]
                if key not in keys or not member.isfile():
                    continue
                data = src.extractfile(member).read()
                self._tar.addfile(member, io.BytesIO(data))
                self.bytes += len(data)
                copied.add(key)
        self.keys |= copied
        missing = keys - copied
        if missing:
            raise RuntimeError(f"{len(missing)} successful sample(s) are missing from {tar_rel}, e.g. {sorted(missing)[:3]}")
        return len(copied)

    def close(self, status: pa.Table) -> dict[str, Any]:
        self._tar.close()
        self._raw.close()
        status = status.cast(STATUS_SCHEMA).sort_by("row")
        ok = {k for k, s in zip(status.column("key").to_pylist(), status.column("status").to_pylist()) if s == SUCCESS}
        if ok != self.keys:
            raise RuntimeError(
                f"status table and tar disagree: {len(ok - self.keys)} success(es) without media, "
                f"{len(self.keys - ok)} stored sample(s) not marked successful"
            )
        with self.storage.open(self.version.rel(STATUS_NAME), "wb") as f:
            pq.write_table(status, f, compression="zstd")
        return summarize(status)


def iter_shard(storage: Storage, dataset: str, shard_key: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for every sample of a committed media shard, in tar order."""
    prefix = media_prefix(dataset, shard_key)
    manifest = storage.read_manifest(prefix)
    current: str | None = None
    files: dict[str, bytes] = {}
    with storage.open(f"{prefix}/{manifest['version']}/{TAR_NAME}", "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if current is not None and key != current:
                yield current, files
                files = {}
            current = key
            files[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, files


def read_status(storage: Storage, dataset: str, shard_key: str) -> pa.Table:
    prefix = media_prefix(dataset, shard_key)
    manifest = storage.read_manifest(prefix)
    with storage.open(f"{prefix}/{manifest['version']}/{STATUS_NAME}") as f:
        return pq.read_table(f)


def status_rows(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)


def media_index(storage: Storage, dataset: str, shard_key: str, manifest: dict[str, Any] | None = None) -> pa.Table:
    """The stored samples of a committed media shard (the current version, or the one ``manifest`` names):
    sample_id, media_tar (relative to the storage root), media_key, media_ext, width, height, duration_s."""
    prefix = media_prefix(dataset, shard_key)
    manifest = manifest or storage.read_manifest(prefix)
    with storage.open(f"{prefix}/{manifest['version']}/{STATUS_NAME}") as f:
        status = pq.read_table(f)
    ok = status.filter(pc.equal(status["status"], SUCCESS))
    ext = ok["ext"] if "ext" in ok.column_names else pa.nulls(ok.num_rows, pa.string())
    default_ext = "mp4" if dataset in ("webvid", "msrvtt", "internvid") else manifest.get("options", {}).get("encode_format", "jpg")
    return pa.table({
        "sample_id": ok["sample_id"],
        "media_tar": pa.array([f"{prefix}/{manifest['version']}/{TAR_NAME}"] * ok.num_rows, pa.string()),
        "media_key": ok["key"],
        "media_ext": pc.fill_null(ext, default_ext),
        "width": ok["width"].cast(pa.int32()),
        "height": ok["height"].cast(pa.int32()),
        "duration_s": ok["duration_s"],
    })
