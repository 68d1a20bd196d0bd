"""A clean-caption shard against the raw shard it was made from: every caption of every raw row (by sample id and
position in its ``captions`` list) is in ``kept.parquet`` or in ``rejected.parquet`` (with a reason), exactly once,
and neither table holds a caption the raw shard does not have."""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from mllm_pipeline.stages.media import shard_index
from mllm_pipeline.storage import Storage
from mllm_pipeline.stages.verify.verdict import Verdict, current_or_missing, iter_parquet, read_columns, unreadable


def raw_shard_rel(storage: Storage, dataset: str, raw_version: str, shard_key: str) -> str | None:
    """Where raw shard ``shard_key`` of the committed raw version ``raw_version`` lies, or None if that version is gone."""
    prefix = f"raw/{dataset}"
    m = storage.committed_version(prefix, raw_version)
    i = shard_index(shard_key)
    if m is None or i >= len(m.get("shards", [])):
        return None
    return f"{prefix}/{raw_version}/{m['shards'][i]['file']}"


def verify_caption_shard(storage: Storage, dataset: str, shard_key: str, manifest: dict | None = None) -> Verdict:
    prefix = f"captions/{dataset}/{shard_key}"
    m, v = current_or_missing(storage, prefix, manifest=manifest)
    if m is None:
        return v
    rel = raw_shard_rel(storage, dataset, m.get("raw_version", ""), shard_key)
    if rel is None:
        v.problem(f"the raw version it was made from ({m.get('raw_version')}) is no longer committed")
        return v
    expected: dict[str, str] = {}
    try:
        for t in iter_parquet(storage, rel, ["sample_id", "captions"]):
            for sid, caps in zip(t["sample_id"].to_pylist(), t["captions"].to_pylist()):
                for i, c in enumerate(caps or []):
                    expected[f"{sid}#{i}"] = c
    except Exception as e:  # noqa: BLE001
        unreadable(v, f"raw shard {rel}", e)
        return v
    v.add("raw_captions", len(expected))
    seen: Counter = Counter()
    where: dict[str, str] = {}
    for name in ("kept", "rejected"):
        try:
            t = read_columns(storage, f"{prefix}/{m['version']}/{name}.parquet", ["sample_id", "caption_index", "reason"])
        except Exception as e:  # noqa: BLE001
            unreadable(v, f"{name}.parquet", e)
            continue
        v.add(name, t.num_rows)
        if name == "rejected" and "reason" in t.column_names:
            blank = t.num_rows - pc.sum(pc.is_valid(t["reason"])).as_py() if t.num_rows else 0
            if blank:
                v.problem(f"{blank} rejected caption(s) have no reason")
        ids = pc.binary_join_element_wise(t["sample_id"], t["caption_index"].cast("string"), "#").to_pylist()
        for cid in ids:
            seen[cid] += 1
            where.setdefault(cid, name)
            if cid not in expected:
                v.problem(f"{name}.parquet holds {cid}, which the raw shard does not have")
    for cid, text in expected.items():
        n = seen.get(cid, 0)
        if n == 0:
            sid, i = cid.rsplit("#", 1)
            v.problem(f"caption {i} of {sid} ({(text or '')[:60]!r}) is in neither kept nor rejected")
        elif n > 1:
            v.problem(f"{cid} is stored {n} times (kept and/or rejected)")
    return v
