"""The committed manifests against the versions they were built from (their recorded inputs): every kept caption
(``sample_id#caption_index``) whose media is stored is in exactly one manifest split, or set aside with a reason:
``rejected.parquet`` (too long), the cross-shard de-duplication (its drops table) or the watermark stage (a clip
it dropped). Nothing is in a split that no kept caption with stored media gives. Kept captions whose media failed
are counted (``without_media``): the media shard's status table holds their reason.

Datasets are verified one at a time, so memory follows the largest dataset's caption ids, not the whole corpus."""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.storage import Storage
from mllm_pipeline.stages.verify.verdict import Verdict, current_or_missing, iter_parquet, read_columns, unreadable

SPLITS = ("train", "val", "test")


def _ids(t) -> list[str]:
    return pc.binary_join_element_wise(t["sample_id"], t["caption_index"].cast("string"), "#").to_pylist()


def verify_manifests(storage: Storage, prefix: str = "manifests", manifest: dict | None = None) -> Verdict:
    m, v = current_or_missing(storage, prefix, manifest=manifest)
    if m is None:
        return v
    base = f"{prefix}/{m['version']}"
    by_ds: dict[str, dict[str, list[dict[str, str]]]] = defaultdict(lambda: defaultdict(list))
    dedup = None
    for ref in m.get("inputs") or []:
        parts = ref["prefix"].split("/")
        if ref["prefix"] == "captions/_dedup":
            dedup = ref
        elif parts[0] == "captions" and len(parts) == 3:
            by_ds[parts[1]]["captions"].append(ref)
        elif parts[0] == "media" and len(parts) == 3:
            by_ds[parts[1]]["media"].append(ref)
        elif parts[:2] == ["curated", "webvid_watermark"]:
            by_ds["webvid"]["watermark"].append(ref)
        elif parts[0] == "raw" and len(parts) == 2:
            by_ds[parts[1]]["raw"].append(ref)
    outputs = [f"{s}.parquet" for s in SPLITS if storage.exists(f"{base}/{s}.parquet")]
    eval_splits = eval_splits_of(m)
    for ds in sorted(d for d in by_ds if by_ds[d]["captions"]):
        refs = by_ds[ds]
        evaluation = set(eval_rows(storage, refs["raw"], eval_splits, v))  # never dropped by the watermark stage
        usable: set[str] = set()
        for ref in refs["media"]:
            try:
                st = read_columns(storage, f"{ref['prefix']}/{ref['version']}/samples.parquet", ["sample_id", "status"])
            except Exception as e:  # noqa: BLE001
                unreadable(v, f"{ref['prefix']} {ref['version']} status table", e)
                continue
            usable.update(st.filter(pc.equal(st["status"], "success"))["sample_id"].to_pylist())
        set_aside: dict[str, str] = {}
        dropped_samples: dict[str, str] = {}
        for ref in refs["watermark"]:
            try:
                sc = read_columns(storage, f"{ref['prefix']}/{ref['version']}/scores.parquet", ["sample_id", "decision", "reason"])
            except Exception as e:  # noqa: BLE001
                unreadable(v, f"{ref['prefix']} {ref['version']} scores", e)
                continue
            for sid, d, r in zip(sc["sample_id"].to_pylist(), sc["decision"].to_pylist(), sc["reason"].to_pylist()):
                if d == "drop" and sid not in evaluation:
                    dropped_samples[sid] = r or "watermark"
        if dedup is not None and storage.exists(f"{dedup['prefix']}/{dedup['version']}/{ds}.parquet"):
            try:
                d = read_columns(storage, f"{dedup['prefix']}/{dedup['version']}/{ds}.parquet", ["sample_id", "caption_index", "reason"])
                set_aside.update(zip(_ids(d), d["reason"].to_pylist()))
            except Exception as e:  # noqa: BLE001
                unreadable(v, f"captions_dedup drops of {ds}", e)
        expected: dict[str, None] = {}
        for ref in refs["captions"]:
            try:
                for t in iter_parquet(storage, f"{ref['prefix']}/{ref['version']}/kept.parquet", ["sample_id", "caption_index"]):
                    for cid, sid in zip(_ids(t), t["sample_id"].to_pylist()):
                        v.add("kept_captions")
                        if sid not in usable:
                            v.add("without_media")
                        elif cid in set_aside:
                            v.add("deduplicated")
                        elif sid in dropped_samples:
                            v.add("watermark_dropped")
                        else:
                            expected[cid] = None
            except Exception as e:  # noqa: BLE001
                unreadable(v, f"{ref['prefix']} {ref['version']} kept.parquet", e)
        if dedup is not None and storage.exists(f"{dedup['prefix']}/{dedup['version']}/merges.parquet"):
            try:  # captions moved here from media duplicates count like the receiving sample's own
                mg = read_columns(storage, f"{dedup['prefix']}/{dedup['version']}/merges.parquet",
                                  ["dataset", "sample_id", "caption_index"])
                mg = mg.filter(pc.equal(mg["dataset"], ds))
                for cid, sid in zip(_ids(mg), mg["sample_id"].to_pylist()):
                    v.add("moved_captions")
                    if sid in usable and sid not in dropped_samples:
                        expected[cid] = None
            except Exception as e:  # noqa: BLE001
                unreadable(v, f"captions_dedup merges of {ds}", e)
        v.add("expected", len(expected))
        seen: Counter = Counter()
        for name in outputs + ["rejected.parquet"]:
            try:
                cols = ["id", "dataset", "reason"] if name == "rejected.parquet" else ["id", "dataset", "task"]
                for t in iter_parquet(storage, f"{base}/{name}", cols):
                    t = t.filter(pc.equal(t["dataset"], ds))
                    if "task" in t.column_names:  # question/answer samples are not caption rows
                        qa = pc.equal(pc.fill_null(t["task"], "caption"), "qa")
                        v.add("qa_samples", int(pc.sum(qa.cast("int64")).as_py() or 0))
                        t = t.filter(pc.invert(qa))
                    else:
                        qa = pc.match_substring(t["id"], "#qa-")
                        v.add("qa_rejected", int(pc.sum(qa.cast("int64")).as_py() or 0))
                        t = t.filter(pc.invert(qa))
                    if name == "rejected.parquet":
                        v.add("rejected", t.num_rows)
                        if t.num_rows and pc.sum(pc.is_valid(t["reason"])).as_py() != t.num_rows:
                            v.problem(f"rejected.parquet has {ds} rows without a reason")
                    else:
                        v.add("in_manifests", t.num_rows)
                    for cid in t["id"].to_pylist():
                        seen[cid] += 1
                        if cid not in expected:
                            v.problem(f"{name} holds {cid}, which no kept caption with stored, usable media gives")
            except Exception as e:  # noqa: BLE001
                unreadable(v, name, e)
        for cid in expected:
            n = seen.get(cid, 0)
            if n == 0:
                v.problem(f"{cid} (a kept caption with usable media) is in no manifest split and not in rejected.parquet")
            elif n > 1:
                v.problem(f"{cid} is in the manifests {n} times")
    return v


def eval_splits_of(manifest: dict) -> tuple[str, ...]:
    """The evaluation split names the manifests were built with (their recorded config)."""
    from mllm_pipeline.manifests.build import EVAL_SPLITS

    cfg = (manifest.get("summary") or {}).get("config") or {}
    return tuple(x.lower() for x in cfg.get("eval_splits") or EVAL_SPLITS)


def eval_rows(storage: Storage, raw_refs: list[dict[str, str]], splits: tuple[str, ...], v: Verdict) -> dict[str, tuple[str, int]]:
    """``sample_id -> (source split, number of captions)`` of the evaluation rows of the raw versions read."""
    out: dict[str, tuple[str, int]] = {}
    for ref in raw_refs:
        m = storage.committed_version(ref["prefix"], ref["version"])
        if m is None:
            v.problem(f"{ref['prefix']} {ref['version']} (an input of the manifests) is not committed any more")
            continue
        for shard in m.get("shards") or []:
            rel = f"{ref['prefix']}/{ref['version']}/{shard['file']}"
            try:
                for t in iter_parquet(storage, rel, ["sample_id", "split", "captions"]):
                    split = pc.utf8_lower(pc.fill_null(t["split"].cast("string"), ""))
                    t = t.filter(pc.is_in(split, pa.array(list(splits))))
                    n = pc.fill_null(pc.list_value_length(t["captions"]), 0).to_pylist()
                    for sid, sp, k in zip(t["sample_id"].to_pylist(), t["split"].cast("string").to_pylist(), n):
                        out[sid] = (sp, int(k))
            except Exception as e:  # noqa: BLE001
                unreadable(v, rel, e)
    return out


def verify_eval_splits(storage: Storage, prefix: str = "manifests", manifest: dict | None = None) -> Verdict:
    """Every evaluation-split row of the raw versions the manifests read, whose media is stored, is in the
    manifests with every one of its captions (caption rows of the split the source names); rows whose media failed
    are counted as ``without_media``. A failure names the sample and what it lost."""
    m, v = current_or_missing(storage, prefix, "evaluation splits", manifest=manifest)
    if m is None:
        return v
    base = f"{prefix}/{m['version']}"
    refs: dict[str, dict[str, list[dict[str, str]]]] = defaultdict(lambda: defaultdict(list))
    for ref in m.get("inputs") or []:
        parts = ref["prefix"].split("/")
        if parts[0] == "raw" and len(parts) == 2:
            refs[parts[1]]["raw"].append(ref)
        elif parts[0] == "media" and len(parts) == 3:
            refs[parts[1]]["media"].append(ref)
    splits = eval_splits_of(m)
    for ds in sorted(refs):
        rows = eval_rows(storage, refs[ds]["raw"], splits, v)
        if not rows:
            continue
        usable: set[str] = set()
        for ref in refs[ds]["media"]:
            try:
                st = read_columns(storage, f"{ref['prefix']}/{ref['version']}/samples.parquet", ["sample_id", "status"])
                usable.update(st.filter(pc.equal(st["status"], "success"))["sample_id"].to_pylist())
            except Exception as e:  # noqa: BLE001
                unreadable(v, f"{ref['prefix']} {ref['version']} status table", e)
        got: Counter = Counter()
        for s in SPLITS:
            if not storage.exists(f"{base}/{s}.parquet"):
                continue
            for t in iter_parquet(storage, f"{base}/{s}.parquet", ["sample_id", "dataset", "task"]):
                t = t.filter(pc.and_(pc.equal(t["dataset"], ds), pc.equal(pc.fill_null(t["task"], "caption"), "caption")))
                got.update(t["sample_id"].to_pylist())
        for sid, (sp, n) in rows.items():
            v.add("eval_samples")
            v.add("eval_captions", n)
            if sid not in usable:
                v.add("without_media")
                continue
            v.add("eval_captions_out", min(got.get(sid, 0), n))
            if got.get(sid, 0) != n:
                v.problem(f"{ds} {sp} sample {sid} has {n} caption(s) in the raw rows and {got.get(sid, 0)} in the manifests")
    return v
