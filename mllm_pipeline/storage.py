"""One storage root for every asset: a local directory or ``s3://bucket/prefix``.

Everything the pipeline writes lives under a single root, chosen once (the ``MLLM_STORAGE_ROOT`` environment
variable, or the ``storage`` resource's ``root`` in Dagster). Local paths and S3 go through the same code, via
fsspec/s3fs, so a test against a local directory exercises the same calls as a run against a bucket.

Two rules make a killed run harmless:

* **Atomic files.** :meth:`Storage.atomic_write` writes to a hidden temporary name next to the target and
  renames it into place only after the write finished without error. A reader never sees a half-written file
  under its final name. (On S3 the rename is a server-side copy; an object only exists once its upload has
  completed, so a killed upload leaves at most a hidden ``.tmp-`` object, never a truncated one.)
* **Committed versions.** A multi-file output (a set of Parquet shards, say) is written into a fresh version
  directory and becomes visible only when its ``_manifest.json`` is written, atomically, last. Readers go through
  the manifest (:meth:`Storage.read_manifest`), so shards of an interrupted run, which no manifest names, are
  never trusted; the next successful commit deletes them.

S3 settings come only from the environment: credentials through the usual ``AWS_*`` variables (never logged),
and an optional endpoint (MinIO, a local S3-compatible server) through ``MLLM_S3_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

DEFAULT_ROOT = "data"
MANIFEST = "_manifest.json"


def s3_storage_options() -> dict[str, Any]:
    """fsspec options for s3:// paths, read from the environment (never from config, never logged)."""
    endpoint = os.environ.get("MLLM_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def storage_options_for(path: str) -> dict[str, Any]:
    return s3_storage_options() if path.startswith(("s3://", "s3a://")) else {}


def filesystem_for(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path as that filesystem names it."""
    fs, fs_path = fsspec.core.url_to_fs(path, **storage_options_for(path))
    return fs, fs_path


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def open_source(path: str, mode: str = "rb"):
    """Open an input file (local or s3://; ``.gz``/``.bz2``/``.xz``/``.zst`` are decompressed on the fly)."""
    return fsspec.open(path, mode, compression="infer", **storage_options_for(path)).open()


def resolve_root(root: str | None = None) -> str:
    """The storage root: the argument, else ``$MLLM_STORAGE_ROOT``, else ``./data`` (made absolute)."""
    root = root or os.environ.get("MLLM_STORAGE_ROOT") or DEFAULT_ROOT
    if is_local(root):
        root = os.path.abspath(root.removeprefix("file://"))
    return root.rstrip("/")


class Storage:
    """A storage root with atomic writes and committed, versioned multi-file outputs."""

    def __init__(self, root: str | None = None):
        self.root = resolve_root(root)
        self.fs, self._fs_root = filesystem_for(self.root)
        self.local = is_local(self.root)

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- naming -------------------------------------------------------------------------------------
    def uri(self, rel: str = "") -> str:
        """Full URI (or absolute local path) of ``rel`` under the root."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def _p(self, rel: str) -> str:
        rel = rel.strip("/")
        return posixpath.join(self._fs_root, rel) if rel else self._fs_root

    # -- plain file operations -------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def open(self, rel: str, mode: str = "rb"):
        path = self._p(rel)
        if self.local and ("w" in mode or "a" in mode):
            os.makedirs(posixpath.dirname(path), exist_ok=True)
        return self.fs.open(path, mode)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        try:
            entries = self.fs.ls(self._p(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def rm(self, rel: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._p(rel), recursive=recursive)

    @contextlib.contextmanager
    def atomic_write(self, rel: str, mode: str = "wb") -> Iterator[Any]:
        """Open ``rel`` for writing; it appears under its name only if the block finishes without error."""
        final = self._p(rel)
        parent, name = posixpath.split(final)
        tmp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        if self.local:
            os.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(tmp, mode) as f:
                yield f
            if self.local:
                os.replace(tmp, final)
            else:
                self.fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.atomic_write(rel) as f:
            f.write(data)

    def write_parquet(self, rel: str, table: Any) -> None:
        """A Parquet file (zstd) at ``rel``, written atomically."""
        import pyarrow.parquet as pq

        with self.atomic_write(rel) as f:
            pq.write_table(table, f, compression="zstd")

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> Any:
        return read_parquet(self.uri(rel), columns)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    # -- committed outputs ----------------------------------------------------------------------------
    def new_version(self, prefix: str) -> Version:
        """Start a new version of the multi-file output at ``prefix`` (see :class:`Version`)."""
        return Version(self, prefix.strip("/"))

    def read_manifest(self, prefix: str) -> dict[str, Any]:
        """The committed manifest of the output at ``prefix``.

        Raises ``FileNotFoundError`` with a readable message when nothing has been committed there yet.
        """
        rel = f"{prefix.strip('/')}/{MANIFEST}"
        try:
            return self.read_json(rel)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"No committed output at {self.uri(prefix)} (no {MANIFEST}): materialize the asset that writes it first."
            ) from None


class Version:
    """A version directory under ``prefix`` that becomes the current output only on :meth:`commit`.

    Files go to ``<prefix>/<version id>/...`` via :meth:`write`-style helpers; :meth:`commit` writes
    ``<prefix>/_manifest.json`` atomically and then removes older version directories (including any left by
    killed runs). If the ``with`` block raises, the version directory is removed and the previous manifest stays.
    """

    def __init__(self, storage: Storage, prefix: str):
        self.storage = storage
        self.prefix = prefix
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        self.id = f"v-{stamp}-{uuid.uuid4().hex[:8]}"
        self.committed = False

    def rel(self, name: str) -> str:
        """Path, relative to the storage root, of ``name`` inside this version."""
        return f"{self.prefix}/{self.id}/{name}"

    def __enter__(self) -> Version:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.committed:
            self.storage.rm(f"{self.prefix}/{self.id}", recursive=True)

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Publish this version: write the manifest last, then drop older versions."""
        manifest = {
            **manifest,
            "version": self.id,
            "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "location": self.storage.uri(f"{self.prefix}/{self.id}"),
        }
        self.storage.write_json(f"{self.prefix}/{MANIFEST}", manifest)
        self.committed = True
        for name in self.storage.listdir(self.prefix):
            if name.startswith("v-") and name != self.id and name < self.id:
                self.storage.rm(f"{self.prefix}/{name}", recursive=True)
        return manifest


def read_parquet(uri: str, columns: list[str] | None = None):
    """A Parquet file at any local path or fsspec URI (s3:// with the endpoint and credentials of the environment)."""
    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)
