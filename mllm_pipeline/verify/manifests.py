"""The committed manifests against the versions they were built from (their recorded inputs): every kept caption
(``sample_id#caption_index``) whose media is stored is in exactly one manifest split, or set aside with a reason:
``rejected.parquet`` (too long), the cross-shard de-duplication (its drops table) or the watermark stage (a clip
it dropped). Nothing is in a split that no kept caption with stored media gives. Kept captions whose media failed
are counted (``without_media``): the media shard's status table holds their reason.

Datasets are verified one at a time, so memory follows the largest dataset's caption ids, not the whole corpus."""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow.compute as pc

from mllm_pipeline.storage import Storage
from mllm_pipeline.verify.verdict import Verdict, iter_parquet, read_columns, unreadable

SPLITS = ("train", "val", "test")


def _ids(t) -> list[str]:
    return pc.binary_join_element_wise(t["sample_id"], t["caption_index"].cast("string"), "#").to_pylist()


def verify_manifests(storage: Storage, prefix: str = "manifests") -> Verdict:
    m = storage.current(prefix)
    if m is None:
        v = Verdict(prefix)
        v.problem("nothing is committed")
        return v
    v = Verdict(f"{prefix} {m['version']}")
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
    outputs = [f"{s}.parquet" for s in SPLITS if storage.exists(f"{base}/{s}.parquet")]
    for ds in sorted(by_ds):
        refs = by_ds[ds]
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
                if d == "drop":
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
        v.add("expected", len(expected))
        seen: Counter = Counter()
        for name in outputs + ["rejected.parquet"]:
            try:
                for t in iter_parquet(storage, f"{base}/{name}", ["id", "dataset", "reason"]):
                    t = t.filter(pc.equal(t["dataset"], ds))
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
