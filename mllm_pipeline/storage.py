"""One storage root for every asset: a local directory or ``s3://bucket/prefix``.

Everything the pipeline writes lives under a single root, chosen once (the ``MLLM_STORAGE_ROOT`` environment
variable, or the ``storage`` resource's ``root`` in Dagster). Local paths and S3 go through the same code, via
fsspec/s3fs, so a test against a local directory exercises the same calls as a run against a bucket.

Two rules make a killed run harmless:

* **Atomic files.** :meth:`Storage.atomic_write` writes to a hidden temporary name next to the target and
  renames it into place only after the write finished without error. A reader never sees a half-written file
  under its final name. (On S3 the rename is a server-side copy; an object only exists once its upload has
  completed, so a killed upload leaves at most a hidden ``.tmp-`` object, never a truncated one.)
* **Committed versions.** A multi-file output (a set of Parquet shards, say) is written into a version
  directory and becomes visible only when its ``_manifest.json`` is written, atomically, last. Readers go through
  the manifest (:meth:`Storage.read_manifest`), so shards of an interrupted run, which no manifest names, are
  never trusted.

A version's id is the digest of what it was made from (:func:`identity_digest`: upstream versions, options, code
version), so re-running a stage on unchanged inputs finds its output already committed
(:meth:`Storage.up_to_date`) and does nothing. Each version records the upstream versions it read (its lineage);
commits never delete anything, and :mod:`mllm_pipeline.stages.lineage` removes old versions by an explicit retention rule
that keeps whatever a kept version still reads. One writer at a time per output (:class:`PrefixLock`).

S3 settings come only from the environment: credentials through the usual ``AWS_*`` variables (never logged),
and an optional endpoint (MinIO, a local S3-compatible server) through ``MLLM_S3_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import io
import os
import posixpath
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

DEFAULT_ROOT = "data"
MANIFEST = "_manifest.json"  # the pointer: the current version of an output
VERSION_FILE = "_version.json"  # inside each committed version directory: its own manifest
LOCK_FILE = "_lock.json"  # the write lock of an output


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


#: The most bytes an input file may give once decompressed (``$MLLM_MAX_INPUT_BYTES``; default 256 GiB, far above
#: the largest real annotation dump: WebVid-10M's CSV is 2.8 GB, InternVid-10M-FLT's JSONL a few GB). A
#: compressed file that expands past it (a decompression bomb) stops the read with :class:`InputTooLarge`.
DEFAULT_MAX_INPUT_BYTES = 256 << 30


class InputTooLarge(ValueError):
    """An input file gave more bytes than the configured limit."""


class _Capped(io.RawIOBase):
    """A read-only stream that refuses to give more than ``limit`` bytes."""

    def __init__(self, f: Any, path: str, limit: int):
        self.f, self.path, self.limit, self.n = f, path, limit, 0

    def readable(self) -> bool:
        return True

    def _count(self, k: int) -> None:
        self.n += k
        if self.n > self.limit:
            raise InputTooLarge(f"{self.path}: more than {self.limit:,} bytes once decompressed (the limit, "
                                "MLLM_MAX_INPUT_BYTES): a decompression bomb or the wrong file; raise the limit if the "
                                "file is real")

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        self._count(len(data))
        b[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:  # whole file: in blocks, so the limit bites before memory does
            parts = []
            while block := self.f.read(16 << 20):
                self._count(len(block))
                parts.append(block)
            return b"".join(parts)
        data = self.f.read(size)
        self._count(len(data))
        return data

    def close(self) -> None:
        self.f.close()
        super().close()


def open_source(path: str, mode: str = "rb", max_bytes: int | None = None):
    """Open an input file (local or s3://; ``.gz``/``.bz2``/``.xz``/``.zst`` are decompressed on the fly), giving at
    most ``max_bytes`` (default ``$MLLM_MAX_INPUT_BYTES`` or :data:`DEFAULT_MAX_INPUT_BYTES`)."""
    f = fsspec.open(path, mode, compression="infer", **storage_options_for(path)).open()
    limit = max_bytes or int(os.environ.get("MLLM_MAX_INPUT_BYTES") or DEFAULT_MAX_INPUT_BYTES)
    return io.BufferedReader(_Capped(f, path, limit), buffer_size=1 << 20) if "b" in mode else f


def resolve_root(root: str | None = None) -> str:
    """The storage root: the argument, else ``$MLLM_STORAGE_ROOT``, else ``./data`` (made absolute)."""
    root = root or os.environ.get("MLLM_STORAGE_ROOT") or DEFAULT_ROOT
    if is_local(root):
        root = os.path.abspath(root.removeprefix("file://"))
    return root.rstrip("/")


class Storage:
    """A storage root with atomic writes and committed, versioned multi-file outputs."""

    def __init__(self, root: str | None = None, gate: Any = None):
        """``gate``: called as ``gate(version, manifest)`` on every commit, after the version's files are written
        and before it becomes current; it returns the manifest to publish or raises to refuse the version (see
        :mod:`mllm_pipeline.stages.gate`). None: commit without checks."""
        self.root = resolve_root(root)
        self.gate = gate
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
    def new_version(self, prefix: str, identity: Any = None, *, inputs: list[dict[str, str]] | None = None,
                    fresh: bool = False) -> Version:
        """Start a new version of the multi-file output at ``prefix`` (see :class:`Version`).

        ``identity`` is what the output is made from (upstream versions, options, code version); the version id is
        its digest, so the same inputs always name the same version. ``inputs`` is the lineage: the exact upstream
        versions read (``{"prefix": ..., "version": ...}``), which retention follows. ``fresh`` makes a new id even
        for the same identity (a forced re-fetch, a retry), so a version that others read is never rewritten.
        """
        return Version(self, prefix.strip("/"), identity, inputs=inputs or [], fresh=fresh)

    def current(self, prefix: str) -> dict[str, Any] | None:
        """The committed manifest of ``prefix``, or None when nothing has been committed there."""
        try:
            return self.read_json(f"{prefix.strip('/')}/{MANIFEST}")
        except FileNotFoundError:
            return None

    def read_manifest(self, prefix: str) -> dict[str, Any]:
        """The committed manifest of the output at ``prefix``.

        Raises ``FileNotFoundError`` with a readable message when nothing has been committed there yet.
        """
        m = self.current(prefix)
        if m is None:
            raise FileNotFoundError(
                f"No committed output at {self.uri(prefix)} (no {MANIFEST}): materialize the asset that writes it first."
            )
        return m

    def committed_version(self, prefix: str, version_id: str) -> dict[str, Any] | None:
        """The manifest of one committed version of ``prefix`` (current or not), or None."""
        try:
            return self.read_json(f"{prefix.strip('/')}/{version_id}/{VERSION_FILE}")
        except FileNotFoundError:
            return None

    def up_to_date(self, prefix: str, identity: Any) -> dict[str, Any] | None:
        """The committed manifest made from exactly ``identity``, if there is one, else None.

        The current version when it matches; otherwise an earlier committed version with that identity (a change
        that was undone), which becomes current again: nothing is recomputed or fetched."""
        digest = identity_digest(identity)
        cur = self.current(prefix)
        if cur is not None and cur.get("identity_digest") == digest:
            return cur
        old = self.committed_version(prefix, f"v-{digest}")
        if old is None:
            return None
        with self.lock(prefix):
            self.write_json(f"{prefix.strip('/')}/{MANIFEST}", old)
        return old

    @contextlib.contextmanager
    def lock(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Hold the write lock of ``prefix`` (see :class:`PrefixLock`)."""
        lk = PrefixLock(self, prefix.strip("/"))
        lk.acquire()
        try:
            yield lk.info
        finally:
            lk.release()


class ConcurrentWriteError(RuntimeError):
    """Another run holds the write lock of an output; nothing was written."""


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when that cannot be told."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 -- no psutil, no such process, no permission: unknown
        return None


def process_record() -> dict[str, Any]:
    """Who holds something (a write lock, a pin, a scratch folder): this machine, this process and its start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start_time(os.getpid())}


def holder_alive(record: dict[str, Any]) -> bool:
    """The one liveness rule for what a process holds (write locks, pins, scratch folders), written by
    :func:`process_record`: a holder on another machine is alive (this machine cannot tell); on this machine it is
    alive while its pid exists **and** (when recorded) that pid's process started when the holder's did, so a pid
    reused by another process after a kill does not keep a dead holder alive."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        pid = int(record.get("pid") or 0)
    except (TypeError, ValueError):
        return False
    if not process_alive(pid):
        return False
    started = record.get("started")
    if started is None:
        return True
    now = process_start_time(pid)
    return now is None or abs(now - float(started)) < 1.0


SCRATCH_OWNER = ".mllm-owner.json"  # in each scratch folder: process_record() of the process that made it


def sweep_scratch(parent: str | None = None, prefix: str = "mllm-") -> list[str]:
    """Remove the scratch folders (``<prefix>*`` under ``parent``, default the system temp dir) whose owner is dead
    by :func:`holder_alive` (a killed run's); folders without an owner record are left alone. Returns the removed."""
    import shutil
    import tempfile

    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        path = os.path.join(parent, name)
        try:
            with open(os.path.join(path, SCRATCH_OWNER), encoding="utf-8") as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and not holder_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def make_scratch_dir(prefix: str, parent: str | None = None) -> str:
    """A new scratch folder ``<parent>/<prefix>XXXX`` (``mkdtemp``) owned by this process; scratch folders that
    killed runs left under ``parent`` are removed first (:func:`sweep_scratch`). The caller removes it."""
    import tempfile

    with contextlib.suppress(OSError):
        sweep_scratch(parent)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(path, SCRATCH_OWNER), "w", encoding="utf-8") as f:
        json.dump(process_record(), f)
    return path


@contextlib.contextmanager
def scratch_dir(prefix: str, parent: str | None = None) -> Iterator[str]:
    """:func:`make_scratch_dir` for the block, removed after it (a killed run's is removed by the next one)."""
    import shutil

    path = make_scratch_dir(prefix, parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stale_lock(held: dict[str, Any]) -> bool:
    """A write lock whose holder is dead (:func:`holder_alive`): writers and retention take it over."""
    return not holder_alive(held)


class PrefixLock:
    """One writer at a time per output: ``<prefix>/_lock.json``, created only if it does not exist.

    Local roots create it with ``O_EXCL``; S3 roots with a conditional PUT (``If-None-Match: *``), so two runs on
    different machines cannot both hold it. A lock left by a killed process on this machine (its pid is gone, or
    now names a process started later: :func:`holder_alive`) is taken over, by writers and by retention alike; a
    lock from another machine is reported with its holder, and removing it is the user's call.
    """

    def __init__(self, storage: Storage, prefix: str):
        self.storage, self.prefix = storage, prefix
        self.rel = f"{prefix}/{LOCK_FILE}"
        self.info = {"token": uuid.uuid4().hex, **process_record(),
                     "run_id": os.environ.get("DAGSTER_RUN_ID", ""), "since": _now()}

    def _create(self) -> bool:
        data = json.dumps(self.info).encode()
        path = self.storage._p(self.rel)
        if self.storage.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            with self.storage.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except OSError as e:  # s3fs reports a failed precondition as an OSError on some versions
            if "Precondition" in str(e) or "412" in str(e):
                return False
            raise
        return True

    def acquire(self) -> None:
        for _ in range(2):
            if self._create():
                return
            try:
                held = self.storage.read_json(self.rel)
            except (FileNotFoundError, ValueError):
                continue  # released (or being written) in between: try again
            if stale_lock(held):
                self.storage.rm(self.rel)  # its process is gone (killed): the lock is stale
                continue
            run = f"Dagster run {held['run_id']}, " if held.get("run_id") else ""
            raise ConcurrentWriteError(
                f"{self.storage.uri(self.prefix)} is being written by another run ({run}process {held.get('pid')} on "
                f"{held.get('host')}, since {held.get('since')}); nothing was written. "
                f"Run again when it has finished. If that process no longer exists, delete {self.storage.uri(self.rel)}."
            )
        raise ConcurrentWriteError(f"could not take the write lock {self.storage.uri(self.rel)}")

    def held(self) -> bool:
        try:
            return self.storage.read_json(self.rel).get("token") == self.info["token"]
        except (FileNotFoundError, ValueError):
            return False

    def release(self) -> None:
        if self.held():
            self.storage.rm(self.rel)


def identity_digest(identity: Any) -> str:
    """The digest that names a version: canonical JSON of what it was made from."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()[:20]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


class Version:
    """A version directory under ``prefix`` that becomes the current output only on :meth:`commit`.

    The id is ``v-<digest of the identity>``; files go to ``<prefix>/<id>/...``. Entering the ``with`` block takes
    the prefix's write lock (a second writer fails at once with :class:`ConcurrentWriteError`) and clears what a
    killed run may have left under the same id. :meth:`commit` writes ``<prefix>/<id>/_version.json`` and then
    ``<prefix>/_manifest.json`` (the pointer), each atomically. Nothing is deleted on commit: earlier versions stay
    until a retention rule removes them (:mod:`mllm_pipeline.stages.lineage`), which never removes a version that a kept
    version still reads. If the block raises, this version's directory is removed and the previous pointer stays.
    """

    def __init__(self, storage: Storage, prefix: str, identity: Any = None, *, inputs: list[dict[str, str]],
                 fresh: bool = False):
        self.storage = storage
        self.prefix = prefix
        self.identity = identity
        self.inputs = inputs
        self.digest = identity_digest(identity) if identity is not None else uuid.uuid4().hex[:20]
        self.id = f"v-{self.digest}"
        if fresh or identity is None:  # never the id of a version others may read
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
            self.id = f"v-{self.digest}-{stamp}-{uuid.uuid4().hex[:6]}"
        self.committed = False
        self._lock = PrefixLock(storage, prefix)
        self._entered = False

    def rel(self, name: str) -> str:
        """Path, relative to the storage root, of ``name`` inside this version."""
        return f"{self.prefix}/{self.id}/{name}"

    def __enter__(self) -> Version:
        self._lock.acquire()
        self._entered = True
        if self.storage.committed_version(self.prefix, self.id) is not None:
            self._lock.release()
            raise RuntimeError(f"{self.storage.uri(self.prefix)}/{self.id} is already committed; it is never rewritten")
        self.storage.rm(f"{self.prefix}/{self.id}", recursive=True)  # leftovers of a killed run with the same id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and not self.committed:
                self.storage.rm(f"{self.prefix}/{self.id}", recursive=True)
        finally:
            if self._entered:
                self._lock.release()

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Publish this version: its own manifest, then the pointer. Older versions are kept.

        The storage's gate (if any) sees the full manifest first, with every file of the version in place; if it
        raises, nothing is published (and the ``with`` block removes the version directory)."""
        if self._entered and not self._lock.held():
            raise ConcurrentWriteError(f"the write lock of {self.storage.uri(self.prefix)} was taken over while this "
                                       "run was writing; nothing was committed")
        manifest = {
            **manifest,
            "version": self.id,
            "identity": self.identity,
            "identity_digest": self.digest,
            "inputs": self.inputs,
            "committed_at": _now(),
            "location": self.storage.uri(f"{self.prefix}/{self.id}"),
            "prefix": self.prefix,
        }
        if self.storage.gate is not None:
            manifest = self.storage.gate(self, manifest)
        self.storage.write_json(f"{self.prefix}/{self.id}/{VERSION_FILE}", manifest)
        self.storage.write_json(f"{self.prefix}/{MANIFEST}", manifest)
        self.committed = True
        return manifest


def read_parquet(uri: str, columns: list[str] | None = None):
    """A Parquet file at any local path or fsspec URI (s3:// with the endpoint and credentials of the environment)."""
    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)
