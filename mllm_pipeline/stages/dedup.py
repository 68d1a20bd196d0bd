"""The caption de-duplication stage, across shards and across modalities.

``captions/_dedup/<version>/<dataset>.parquet`` — :func:`dedup_and_commit`: for each dataset, in shard order,
exact and near duplicates across shards and against the evaluation splits (MSR-VTT test, COCO val), so nothing
an evaluation uses is trained on, and samples whose media are the same (content and perceptual hashes) merged
into one. The evaluation rows themselves are kept as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.stages.captions import config_identity, captions_prefix, read_kept
from mllm_pipeline.stages.registry import DATASET_NAMES
from mllm_pipeline.stages.media import committed_shards
from mllm_pipeline.storage import Storage, read_parquet
from mllm_pipeline.text.config import REJECTED_SCHEMA, CleanConfig
from mllm_pipeline.text.dedup import DedupIndex, dedup_across

DEDUP_PREFIX = "captions/_dedup"
#: Bump when a de-duplication rule changes what comes out for the same captions and config.
DEDUP_CODE_VERSION = "caption-dedup-3"


def _eval_rows(storage: Storage, splits: tuple[str, ...], log: Any) -> dict[str, pa.Table]:
    """The evaluation-split rows (sample_id, split, captions) of every dataset, read from its current raw shards."""
    out: dict[str, pa.Table] = {}
    for dataset in DATASET_NAMES:
        try:
            shards = raw_shards(storage, dataset)
        except FileNotFoundError:
            continue
        parts = []
        for raw in shards:
            t = read_parquet(raw.uri, columns=["sample_id", "captions", "split"])
            split = pc.utf8_lower(pc.fill_null(t["split"].cast(pa.string()), ""))
            parts.append(t.filter(pc.is_in(split, pa.array(list(splits)))).select(["sample_id", "split", "captions"]))
        if parts and sum(p.num_rows for p in parts):
            out[dataset] = pa.concat_tables(parts)
    return out


def dedup_inputs(storage: Storage, media: bool = True) -> list[dict[str, str]]:
    """The exact versions :func:`dedup_and_commit` reads: every committed caption shard, the raw versions (their
    evaluation splits) and, with ``media``, the media hashes of every shard."""
    from mllm_pipeline.stages.media_hashes import hashes_prefix

    refs = []
    for dataset in DATASET_NAMES:
        for key in committed_shards(storage, dataset, "captions"):
            prefix = captions_prefix(dataset, key)
            refs.append({"prefix": prefix, "version": storage.read_manifest(prefix)["version"]})
            if media:
                h = storage.current(hashes_prefix(dataset, key))
                if h is not None:
                    refs.append({"prefix": hashes_prefix(dataset, key), "version": h["version"]})
        m = storage.current(f"raw/{dataset}")
        if m is not None:
            refs.append({"prefix": f"raw/{dataset}", "version": m["version"]})
    return refs


def _media_items(storage: Storage, eval_ids: dict[str, set[str]], log: Any) -> tuple[pa.Table | None, list[str]]:
    """Every stored sample's hashes (in dataset, shard, row order) with its evaluation flag; and the problems
    (media shards whose hashes are missing or were made from other media than the current version)."""
    from mllm_pipeline.stages.media import media_prefix
    from mllm_pipeline.stages.media_hashes import hashes_prefix, read_hashes

    parts, problems, missing = [], [], []
    for dataset in DATASET_NAMES:
        for key in committed_shards(storage, dataset, "captions"):
            media = storage.current(media_prefix(dataset, key))
            if media is None:
                continue
            h = storage.current(hashes_prefix(dataset, key))
            if h is None:
                missing.append(f"{dataset} {key}")
                continue
            if h.get("media_version") != media["version"]:
                problems.append(f"media_hashes for {dataset} {key} were made from media {h.get('media_version')}, "
                                f"the current media is {media['version']}")
                continue
            t = read_hashes(storage, dataset, key, h["version"]).sort_by("key")  # keys follow the raw rows' order
            ev = eval_ids.get(dataset, set())
            parts.append(t.select(["sample_id", "media_kind", "content", "phash"])
                         .append_column("dataset", pa.array([dataset] * t.num_rows, pa.string()))
                         .append_column("is_eval", pa.array([s in ev for s in t["sample_id"].to_pylist()], pa.bool_())))
    if missing:  # a protection that cannot run stops the stage: it never carries on with a warning
        problems.append(f"{len(missing)} media shard(s) have no media hashes (e.g. {missing[0]}), so media copies of "
                        "evaluation samples and media duplicates cannot be looked for")
    return (pa.concat_tables(parts) if parts else None), problems


def dedup_and_commit(storage: Storage, config: CleanConfig, log: Any, media_config: Any = None) -> dict[str, Any]:
    """Curation across shards and datasets; commits what the manifests must leave out or move.

    1. **Evaluation leaks by caption**: every training caption against the captions of every evaluation split
       (exact key or MinHash near match), and against earlier training captions when ``dedup_scope="dataset"``.
    2. **Media duplicates** (:func:`mllm_pipeline.vision.media_dedup.find_media_duplicates`, from the committed
       media hashes): a training sample whose medium copies an evaluation sample's is an ``eval_leak``; one that
       copies an earlier kept sample's is a ``media_duplicate``, and its captions move to that sample (those that
       duplicate a caption the sample already has are left out).
    3. **Caption cap** (``max_caption_repeats``): a caption seen that many times in training already is dropped.

    Evaluation samples are never dropped and never gain captions. Writes ``<dataset>.parquet`` (the dropped
    captions, with reason and detail), ``media.parquet`` (one row per dropped sample) and ``merges.parquet`` (the
    captions moved to another sample). Returns the summary; when the inputs and config are those of the committed
    result, nothing is recomputed."""
    from mllm_pipeline.vision.media_dedup import MediaDedupConfig, describe, find_media_duplicates

    media_config = media_config or MediaDedupConfig()
    inputs = dedup_inputs(storage, media_config.enabled)
    identity = {"stage": "caption_dedup", "code": DEDUP_CODE_VERSION, "inputs": inputs, "config": config_identity(config),
                "media": dataclasses.asdict(media_config)}
    done = storage.up_to_date(DEDUP_PREFIX, identity)
    if done is not None:
        log.info(f"up to date: {done['version']} was made from these {len(inputs)} caption, media-hash and raw versions")
        return {**done["summary"], "examples": done.get("examples", []), "version": done["version"], "up_to_date": True}
    eval_rows = _eval_rows(storage, config.eval_splits, log)
    eval_ids = {ds: set(t["sample_id"].to_pylist()) for ds, t in eval_rows.items()}
    index = DedupIndex(config)
    eval_added: dict[str, int] = {}
    for dataset, rows in eval_rows.items():
        splits = rows["split"].cast(pa.string())
        for split in sorted(set(splits.to_pylist())):
            name = f"{dataset}:{split}"
            eval_added[name] = index.add_eval(rows.filter(pc.equal(splits, split)), name, dataset)
    log.info(f"evaluation captions in the index: {eval_added or 'none'}")

    # media decisions first: they say which samples' captions move where
    media_drops: dict[tuple[str, str], dict[str, Any]] = {}
    media_counts: dict[str, int] = {}
    decisions = None
    if media_config.enabled:
        items, problems = _media_items(storage, eval_ids, log)
        if problems:
            raise ValueError("the media hashes do not cover the media: " + "; ".join(problems) + ". Materialize them "
                             "first: dagster asset materialize -m mllm_pipeline.definitions --select media_hashes "
                             "(or set media_dedup: false in captions_dedup's config to run without media "
                             "de-duplication; evaluation samples are then protected by their captions only). Nothing "
                             "was written.")
        if items is not None:
            decisions = find_media_duplicates(items, media_config)
            media_counts = decisions.counts
            media_drops = {(r["dataset"], r["sample_id"]): r for r in decisions.drops.to_pylist()}
            log.info(f"media: {media_counts}")
    targets: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for (ds, sid), r in media_drops.items():
        if r["reason"] == "media_duplicate":
            targets.setdefault((r["kept_dataset"], r["kept_sample_id"]), []).append((ds, sid))

    counts: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    donated: dict[tuple[str, str], list[dict[str, Any]]] = {}  # captions of media duplicates, by donor
    own: dict[tuple[str, str], list[dict[str, Any]]] = {}  # captions of the samples that receive them
    drops_by_ds: dict[str, list[pa.Table]] = {}
    with storage.new_version(DEDUP_PREFIX, identity, inputs=inputs) as version:
        for dataset in DATASET_NAMES:
            shards = committed_shards(storage, dataset, "captions")
            if not shards:
                continue
            ev = pa.array(sorted(eval_ids.get(dataset, ())), pa.string())
            mdrop = {sid for (ds, sid) in media_drops if ds == dataset}
            recv = {sid for (ds, sid) in targets if ds == dataset}

            want = pa.array(sorted(mdrop | recv), pa.string())
            picked: list[pa.Table] = []  # captions of media-dropped and receiving samples, taken in the same pass

            def kept_tables(dataset: str = dataset, shards: list[str] = shards, ev: pa.Array = ev):
                for key in shards:
                    kept = read_kept(storage, dataset, key)
                    if len(ev):  # evaluation samples are not checked against themselves, and never dropped
                        kept = kept.filter(pc.invert(pc.is_in(kept["sample_id"], ev)))
                    if len(want):
                        picked.append(kept.filter(pc.is_in(kept["sample_id"], want)))
                    yield key, kept

            result = dedup_across(kept_tables(), index, config)
            c = dict(result.counts)
            tables = [d for d in result.drops if d.num_rows]
            leaked = {(s, i) for d in tables for s, i in zip(d["sample_id"].to_pylist(), d["caption_index"].to_pylist())}
            mrows: list[dict[str, Any]] = []
            for part in picked:
                for r in part.select(["sample_id", "caption_index", "caption", "caption_raw", "dedup_hash", "minhash"]).to_pylist():
                    if (r["sample_id"], r["caption_index"]) in leaked:
                        continue
                    if r["sample_id"] in recv:
                        own.setdefault((dataset, r["sample_id"]), []).append(r)
                    if r["sample_id"] in mdrop:
                        d = media_drops[(dataset, r["sample_id"])]
                        mrows.append({"sample_id": r["sample_id"], "caption_index": r["caption_index"],
                                      "caption_raw": r["caption_raw"], "caption_clean": r["caption"],
                                      "reason": d["reason"], "detail": describe(d)})
                        if d["reason"] == "media_duplicate":
                            donated.setdefault((dataset, r["sample_id"]), []).append(r)
            if mrows:
                tables.append(pa.Table.from_pylist(mrows, schema=REJECTED_SCHEMA))
            drops_by_ds[dataset] = tables
            c["media_duplicate"] = sum(1 for r in mrows if r["reason"] == "media_duplicate")
            c["eval_leak"] += sum(1 for r in mrows if r["reason"] == "eval_leak")
            c["captions_kept"] -= len(mrows)
            counts.append({"dataset": dataset, "shards": len(shards), "captions_checked": c["captions_in"],
                           "kept": c["captions_kept"], "exact_duplicate": c["exact_duplicate"],
                           "near_duplicate": c["near_duplicate"], "eval_leak": c["eval_leak"],
                           "media_duplicate": c["media_duplicate"], "captions_merged": 0, "caption_cap": 0})
            log.info(f"[{dataset}] {len(shards)} shard(s): {c}")

        merges = _merge_captions(targets, own, donated, config)
        by_ds = {r["dataset"]: r for r in counts}
        for m in merges:
            by_ds[m["dataset"]]["captions_merged"] += 1
        capped = _cap_captions(storage, drops_by_ds, merges, eval_ids, config) if config.max_caption_repeats else {}
        if capped:
            merges = [m for m in merges if (m["dataset"], m["sample_id"], m["caption_index"]) not in capped]
            for (ds, _, _), row in capped.items():
                if row is not None:
                    drops_by_ds.setdefault(ds, []).append(pa.Table.from_pylist([row], schema=REJECTED_SCHEMA))
                by_ds[ds]["caption_cap"] += 1
        for dataset, tables in drops_by_ds.items():
            if tables:
                drops = pa.concat_tables(tables)
                storage.write_parquet(version.rel(f"{dataset}.parquet"), drops)
                examples += drops.slice(0, max(0, 8 - len(examples))).select(["sample_id", "caption_raw", "reason", "detail"]).to_pylist()
            row = by_ds[dataset]
            row["kept"] = row["captions_checked"] - sum(t.num_rows for t in tables)
        storage.write_parquet(version.rel(MERGES), pa.Table.from_pylist(merges, schema=MERGES_SCHEMA))
        if decisions is not None:
            storage.write_parquet(version.rel(MEDIA), decisions.drops)
        summary = {"datasets": counts, "eval_captions": eval_added, "media": media_counts,
                   "eval_samples": {ds: len(ids) for ds, ids in eval_ids.items()}}
        committed = version.commit({"kind": "caption_dedup", "summary": summary, "examples": examples,
                                    "files": [f"{r['dataset']}.parquet" for r in counts] + [MERGES, MEDIA]})
    return {**summary, "examples": examples, "version": committed["version"], "up_to_date": False}


#: A caption moved from a media duplicate gets an index from here up, so its id never meets an own caption's.
MERGED_BASE = 1_000_000
MERGES = "merges.parquet"
MEDIA = "media.parquet"
MERGES_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),  # the receiving (kept) sample
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("caption_index", pa.int32(), nullable=False),  # MERGED_BASE + n
    pa.field("caption", pa.string(), nullable=False),
    pa.field("from_dataset", pa.string(), nullable=False),
    pa.field("from_sample_id", pa.string(), nullable=False),
    pa.field("from_caption_index", pa.int32(), nullable=False),
    pa.field("dedup_hash", pa.uint64(), nullable=False),
])


def _merge_captions(targets: dict[tuple[str, str], list[tuple[str, str]]], own: dict[tuple[str, str], list[dict[str, Any]]],
                    donated: dict[tuple[str, str], list[dict[str, Any]]], config: CleanConfig) -> list[dict[str, Any]]:
    """The donors' captions each kept sample receives, less those that duplicate (exact key or MinHash near
    match) a caption it already has, in donor order."""
    out: list[dict[str, Any]] = []
    for (ds, sid) in sorted(targets):
        have = list(own.get((ds, sid), []))
        n = 0
        for donor in targets[(ds, sid)]:
            for r in donated.get(donor, []):
                if config.exact_dedup and any(r["dedup_hash"] == h["dedup_hash"] for h in have):
                    continue
                if config.near_dedup and any(
                        sum(1 for a, b in zip(r["minhash"], h["minhash"]) if a == b) / config.num_perm >= config.near_dup_threshold
                        for h in have):
                    continue
                have.append(r)
                out.append({"dataset": ds, "sample_id": sid, "caption_index": MERGED_BASE + n, "caption": r["caption"],
                            "from_dataset": donor[0], "from_sample_id": donor[1], "from_caption_index": r["caption_index"],
                            "dedup_hash": r["dedup_hash"]})
                n += 1
    return out


def _cap_captions(storage: Storage, drops_by_ds: dict[str, list[pa.Table]], merges: list[dict[str, Any]],
                  eval_ids: dict[str, set[str]], config: CleanConfig) -> dict[tuple[str, str, int], dict[str, Any] | None]:
    """Training captions beyond the ``max_caption_repeats``-th of the same duplicate key (in dataset, shard, row
    order; moved captions after their receiver's own). Returns ``(dataset, sample_id, caption_index) -> rejected
    row`` (None for a moved caption, which is simply not moved)."""
    cap = int(config.max_caption_repeats or 0)
    seen: dict[int, int] = {}
    out: dict[tuple[str, str, int], dict[str, Any] | None] = {}
    merged_by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in merges:
        merged_by.setdefault((m["dataset"], m["sample_id"]), []).append(m)
    for dataset in DATASET_NAMES:
        gone = {(s, i) for t in drops_by_ds.get(dataset, []) for s, i in zip(t["sample_id"].to_pylist(), t["caption_index"].to_pylist())}
        ev = eval_ids.get(dataset, set())
        for key in committed_shards(storage, dataset, "captions"):
            kept = read_kept(storage, dataset, key, ["sample_id", "caption_index", "caption", "caption_raw", "dedup_hash"])
            last = None
            for r in kept.to_pylist() + [None]:
                sid = r["sample_id"] if r else None
                if last is not None and sid != last:  # after a sample's own captions, the ones it receives
                    for m in merged_by.get((dataset, last), []):
                        seen[m["dedup_hash"]] = seen.get(m["dedup_hash"], 0) + 1
                        if seen[m["dedup_hash"]] > cap:
                            out[(dataset, last, m["caption_index"])] = None
                last = sid
                if r is None or sid in ev or (sid, r["caption_index"]) in gone:
                    continue
                seen[r["dedup_hash"]] = seen.get(r["dedup_hash"], 0) + 1
                if seen[r["dedup_hash"]] > cap:
                    out[(dataset, sid, r["caption_index"])] = {
                        "sample_id": sid, "caption_index": r["caption_index"], "caption_raw": r["caption_raw"],
                        "caption_clean": r["caption"], "reason": "caption_cap",
                        "detail": f"the same caption is already kept {cap} time(s) in training"}
    return out


def _dedup_file(storage: Storage, name: str, version: str | None) -> pa.Table | None:
    """A file of the committed de-duplication (``version``, default the current one), or None."""
    if version is None:
        m = storage.current(DEDUP_PREFIX)
        if m is None:
            return None
        version = m["version"]
    rel = f"{DEDUP_PREFIX}/{version}/{name}"
    return storage.read_parquet(rel) if storage.exists(rel) else None


def dedup_merges(storage: Storage, dataset: str, version: str | None = None) -> pa.Table | None:
    """The captions moved to ``dataset``'s samples from their media duplicates (``MERGES_SCHEMA``), or None."""
    t = _dedup_file(storage, MERGES, version)
    return None if t is None else t.filter(pc.equal(t["dataset"], dataset))


def dedup_drops(storage: Storage, dataset: str, version: str | None = None) -> pa.Table | None:
    """The captions :func:`dedup_and_commit` drops for ``dataset`` (sample_id, caption_index, reason ...), or None
    when the de-duplication has not run. ``version``: that committed version (default: the current one)."""
    return _dedup_file(storage, f"{dataset}.parquet", version)
