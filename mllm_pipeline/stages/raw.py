"""Raw ingest by content: a raw version is named by what it was read from, so unchanged files cost nothing.

The identity of a raw version is the parser (its module and :data:`PARSER_VERSION`), the options that shape its
rows, and a fingerprint of every source file: its path, size and a hash of its content (xxh3-128 of the bytes for
local files, the object's ETag on S3, which the store computes from the content). Hashing a local file is done
once per (size, modification time): the result is cached next to the raw output
(``raw/<dataset>/_fingerprints.json``), so touching a file costs one read of it and a sensor tick on an unchanged
file costs a ``stat``; the modification time alone never decides.

:func:`ingest_versioned` returns the committed report at once when a version with the same identity exists
("up to date"), and otherwise runs the parser, which commits under that identity.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from mllm_pipeline.sources.common import IngestReport, report_from_manifest
from mllm_pipeline.storage import Storage, filesystem_for, is_local

log_default = logging.getLogger(__name__)

#: Bump when the normalized schema or a rule that shapes the rows changes (all parsers).
SCHEMA_VERSION = "raw-4"  # raw-4: eval_set, qa answers; raw-3: the nullable eval_caption and qa columns
FINGERPRINTS = "_fingerprints.json"
#: Options that decide whether a version may be committed, not what its rows are: not part of its identity.
NOT_SHAPING = ("max_quarantine_rate",)
_BLOCK = 16 << 20


def _content_hash(fs: Any, path: str) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with fs.open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def file_fingerprints(storage: Storage, prefix: str, files: list[str], log: Any = None) -> list[dict[str, Any]]:
    """``[{"path", "size", "content"}]`` for ``files``, in order; see the module doc for how content is known."""
    log = log or log_default
    cache_rel = f"{prefix}/{FINGERPRINTS}"
    try:
        cache: dict[str, Any] = storage.read_json(cache_rel)
    except (FileNotFoundError, ValueError):
        cache = {}
    out: list[dict[str, Any]] = []
    changed = False
    for path in files:
        fs, fs_path = filesystem_for(path)
        info = fs.info(fs_path)
        size = int(info.get("size") or 0)
        etag = None if is_local(path) else (info.get("ETag") or info.get("etag"))
        if etag:
            content = f"etag:{str(etag).strip(chr(34))}"
        else:
            stamp = str(info.get("mtime") or info.get("LastModified") or info.get("last_modified") or "")
            hit = cache.get(path)
            if hit and hit.get("size") == size and hit.get("stamp") == stamp:
                content = hit["content"]
            else:
                t0 = time.monotonic()
                content = f"xxh3:{_content_hash(fs, fs_path)}"
                log.info(f"hashed {path} ({size / 1e6:,.1f} MB) in {time.monotonic() - t0:.1f}s")
                cache[path] = {"size": size, "stamp": stamp, "content": content}
                changed = True
        out.append({"path": path, "size": size, "content": content})
    if changed:
        storage.write_json(cache_rel, cache)
    return out


def raw_identity(ingest: Callable[..., IngestReport], fingerprints: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    module = sys.modules.get(ingest.__module__)
    return {
        "stage": "raw",
        "parser": f"{ingest.__module__}.{ingest.__name__}",
        "parser_version": f"{SCHEMA_VERSION}/{getattr(module, 'PARSER_VERSION', '1')}",
        "options": options,
        "files": fingerprints,
    }


def ingest_versioned(ingest: Callable[..., IngestReport], source: Any, storage: Storage, *, prefix: str,
                     files: list[str], options: dict[str, Any], logger: Any = None) -> IngestReport:
    """Run ``ingest(source, storage, **options)`` unless a version made from the same files and options is
    already committed under ``prefix``; either way return its report (``up_to_date`` says which)."""
    log = logger or log_default
    shaping = {k: v for k, v in options.items() if k not in NOT_SHAPING}
    identity = raw_identity(ingest, file_fingerprints(storage, prefix, files, log), shaping)
    done = storage.up_to_date(prefix, identity)
    if done is not None:
        log.info(f"up to date: {storage.uri(prefix)} {done['version']} was made from these {len(files)} file(s) "
                 "with these options; nothing read or written")
        return report_from_manifest(storage, prefix, done)
    return ingest(source, storage, logger=logger, identity=identity, **options)
