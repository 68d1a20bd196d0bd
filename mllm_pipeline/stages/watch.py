"""Which annotation files the ``raw_annotation_files`` sensor watches, and what each of them looks like now.

``$MLLM_WATCH_CONFIG`` names a YAML file (local or ``s3://``) in the shape of the run config a user passes to
``dagster asset materialize -c``: ``ops: {raw_cc3m: {config: {paths: [...]}}, ...}``. Each raw asset listed there is
watched (``paths``, glob patterns allowed; ``directory`` for ``raw_cc3m_wds``; for ``raw_msrvtt`` also its split
lists and MSRVTT-QA files). A file's fingerprint is its size plus its modification time (local) or ETag (S3).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from mllm_pipeline.stages.registry import DATASETS
from mllm_pipeline.storage import filesystem_for, open_source

WATCH_CONFIG_ENV = "MLLM_WATCH_CONFIG"
#: The raw assets, one per dataset (what a watch config may name).
RAW_ASSET_NAMES = [d.raw_asset for d in DATASETS.values()]


class WatchConfigError(ValueError):
    """The watch config file is missing or malformed; the message names the file and what was wrong."""


def load_watch_config(location: str) -> dict[str, dict[str, Any]]:
    """Read a run-config-shaped YAML file and return ``{raw asset: its op config}`` for the raw assets in it."""
    import yaml

    try:
        with open_source(location, "rb") as f:
            doc = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise WatchConfigError(f"{WATCH_CONFIG_ENV}={location}: the file does not exist.") from None
    except yaml.YAMLError as e:
        raise WatchConfigError(f"{WATCH_CONFIG_ENV}={location}: not valid YAML ({e}).") from None
    ops = doc.get("ops") if isinstance(doc, dict) else None
    if not isinstance(ops, dict):
        raise WatchConfigError(f"{location}: expected a run config with a top-level 'ops' mapping, "
                               f"e.g. ops: {{raw_cc3m: {{config: {{paths: [...]}}}}}}; found {type(ops).__name__}.")
    out: dict[str, dict[str, Any]] = {}
    for name, op in ops.items():
        if name not in RAW_ASSET_NAMES:
            continue  # other ops (media assets, ...) may share the file
        config = (op or {}).get("config") or {}
        if not isinstance(config, dict):
            raise WatchConfigError(f"{location}: ops.{name}.config must be a mapping.")
        if name == "raw_cc3m_wds":
            if not config.get("directory"):
                raise WatchConfigError(f"{location}: ops.raw_cc3m_wds.config.directory is empty; nothing to watch.")
        elif not config.get("paths") or not isinstance(config["paths"], list):
            raise WatchConfigError(f"{location}: ops.{name}.config.paths must be a non-empty list of files.")
        out[name] = config
    if not out:
        raise WatchConfigError(f"{location}: names none of the raw assets ({', '.join(RAW_ASSET_NAMES)}).")
    return out


def _with_scheme(original: str, found: str) -> str:
    if "://" in original and "://" not in found:
        return original.split("://", 1)[0] + "://" + found
    return found


def _fingerprint(info: dict[str, Any]) -> str:
    """size plus the object's ETag (S3) or modification time (local): what changes when the file does."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def list_watched_files(spec: list[str], directory: bool = False) -> dict[str, str]:
    """``{path: fingerprint}`` of the files named by ``spec`` (paths, glob patterns, or one directory's files)."""
    files: dict[str, str] = {}
    for entry in spec:
        fs, fs_path = filesystem_for(entry)
        if directory:
            found = fs.find(fs_path, detail=True)
        elif any(ch in entry for ch in "*?["):
            found = fs.glob(fs_path, detail=True)
        else:
            try:
                found = {fs_path: fs.info(fs_path)}
            except FileNotFoundError:
                continue
        for path, info in found.items():
            if info.get("type", "file") == "file":
                files[_with_scheme(entry, path)] = _fingerprint(info)
    return files


def watched_specs(cfg: dict[str, Any]) -> list[str]:
    """The files (or patterns) a raw asset's config reads: ``paths`` plus, for ``raw_msrvtt``, its split lists and
    MSRVTT-QA files, so a changed split list re-ingests like a changed annotation."""
    extra = [cfg[k] for k in ("train_list", "test_list") if cfg.get(k)]
    return list(cfg["paths"]) + extra + list(cfg.get("qa_paths") or [])


def watch_targets() -> tuple[str, dict[str, tuple[dict[str, Any], list[str], bool]]]:
    """(what is watched, {asset: (its op config for the run, files to watch, whether it is a directory)})."""
    location = os.environ.get(WATCH_CONFIG_ENV)
    if location:
        configs = load_watch_config(location)
        return location, {
            name: (cfg, [cfg["directory"]] if name == "raw_cc3m_wds" else watched_specs(cfg), name == "raw_cc3m_wds")
            for name, cfg in configs.items()
        }
    return "", {}


def state_digest(obj: Any) -> str:
    """A short digest of a JSON-able state (the run key of a watched asset's files and config)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


