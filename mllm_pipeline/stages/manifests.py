"""The manifests from what the earlier stages committed on the storage root: clean captions (less the cross-shard
drops), media shards (WebVid as its watermark stage left it) and the raw shards' splits, shard by shard.

:func:`plan_inputs` fixes the exact versions read before anything is built, and checks that they agree: a caption
shard and a media shard must have been made from the rows of the current raw shard (their row digests), and the
watermark scores from the media version used. When they don't, it stops with :class:`InconsistentInputs`, which
names the assets and partitions to materialize again. Those versions (and the tokenizer and config) are the
manifests' identity, so building them again from the same inputs is a no-op."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.stages.media import media_index, media_prefix, shard_index, shard_key
from mllm_pipeline.manifests.build import ManifestConfig, ManifestWriter
from mllm_pipeline.manifests.tokenization import load_tokenizer
from mllm_pipeline.sources.common import RawShard, raw_shards
from mllm_pipeline.stages.registry import DATASET_NAMES, DATASETS
from mllm_pipeline.storage import Storage, Version, read_parquet
from mllm_pipeline.stages.captions import captions_prefix
from mllm_pipeline.stages.media import committed_shards
from mllm_pipeline.stages.dedup import DEDUP_PREFIX, dedup_drops, dedup_merges
from mllm_pipeline.stages.media_hashes import hashes_prefix
from mllm_pipeline.stages.watermark import prefix as watermark_prefix
from mllm_pipeline.stages.watermark import watermark_view

#: Bump when the manifest columns or the way they are computed change.
PREFIX = "manifests"
CODE_VERSION = "manifests-4"  # manifests-4: no LLaVA JSON (the exports write it); manifests-3: the task column, question/answer samples, moved captions, eval reports


HASHES_ROOT = "curated/media_hashes/"


class InconsistentInputs(ValueError):
    """The committed upstream outputs were not made from the same raw data; the message says what to redo."""


@dataclasses.dataclass
class ShardInput:
    dataset: str
    key: str
    raw: RawShard
    captions: dict[str, Any]
    media: dict[str, Any]
    watermark: dict[str, Any] | None


@dataclasses.dataclass
class Plan:
    shards: list[ShardInput]
    dedup: dict[str, Any] | None
    #: per dataset with raw shards the manifests cannot read yet: dataset, raw_shards, built, missing, which
    missing: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def refs(self) -> list[dict[str, str]]:
        out: dict[tuple[str, str], dict[str, str]] = {}
        for s in self.shards:
            for ref in (s.raw.ref(), _ref(s.captions), _ref(s.media), _ref(s.watermark) if s.watermark else None):
                if ref:
                    out[(ref["prefix"], ref["version"])] = ref
        if self.dedup is not None:
            out[(DEDUP_PREFIX, self.dedup["version"])] = _ref(self.dedup)
        return sorted(out.values(), key=lambda r: (r["prefix"], r["version"]))


def _ref(m: dict[str, Any]) -> dict[str, str]:
    return {"prefix": m["prefix"], "version": m["version"]}


def plan_inputs(storage: Storage, datasets: list[str], log: Any, require_all: bool = False) -> Plan:
    """The exact upstream versions the manifests will read, checked for agreement (see the module doc).

    A raw shard without committed media and captions is missing: with ``require_all`` (the config named the
    datasets) that stops the stage, naming the partitions to materialize; otherwise it is logged and listed in the
    plan (and the summary), never silently left out."""
    shards: list[ShardInput] = []
    problems: list[str] = []
    missing: list[dict[str, Any]] = []
    for ds in datasets:
        try:
            raws = raw_shards(storage, ds)
        except FileNotFoundError:
            problems.append(f"raw_{ds} has no committed version: materialize raw_{ds}, then its media and captions")
            continue
        keys = shard_inputs(storage, ds, log)
        have = {shard_index(k) for k in keys}
        absent = [shard_key(i) for i in range(len(raws)) if i not in have]
        if absent:
            d = DATASETS[ds]
            missing.append({"dataset": ds, "raw_shards": len(raws), "built": len(raws) - len(absent),
                            "missing": len(absent), "which": _ranges(absent)})
            msg = (f"{ds}: {len(absent)} of raw_{ds}'s {len(raws)} shard(s) have no committed media and captions "
                   f"({_ranges(absent)}): materialize {d.media_asset} and {d.captions_asset} for those partitions")
            if require_all:
                problems.append(msg + f", or leave {ds} out of the config's datasets")
            else:
                log.warning(msg + "; the manifests are built without them")
        beyond = [k for k in keys if shard_index(k) >= len(raws)]
        if beyond:
            log.warning(f"{ds}: {len(beyond)} committed shard(s) ({beyond[0]} ...) are not in raw_{ds}'s current "
                        f"version ({len(raws)} shard(s)); they are left out")
        stale_caps, stale_media, stale_wm = [], [], []
        for key in keys:
            i = shard_index(key)
            if i >= len(raws):
                continue
            raw = raws[i]
            caps = storage.read_manifest(captions_prefix(ds, key))
            media = storage.read_manifest(media_prefix(ds, key))
            if caps.get("rows_digest") != raw.digest("captions"):
                stale_caps.append(key)
            if media.get("rows_digest") != raw.digest("media"):
                stale_media.append(key)
            wm = storage.current(watermark_prefix(key)) if ds == "webvid" else None
            if wm is not None and wm.get("media_version") != media["version"]:
                stale_wm.append(key)
            shards.append(ShardInput(ds, key, raw, caps, media, wm))
        for what, keys_ in ((DATASETS[ds].captions_asset, stale_caps), (DATASETS[ds].media_asset, stale_media), ("webvid_watermark", stale_wm)):
            if keys_:
                problems.append(f"{what} for {_ranges(keys_)} was made from other data than raw_{ds}'s current version "
                                f"{raws[0].raw_version if raws else '-'}" + (" (the media it scored changed)" if what == "webvid_watermark" else "")
                                + f": materialize {what} for {_ranges(keys_)}")
    dedup = storage.current(DEDUP_PREFIX)
    if dedup is None:  # the evaluation-leak search never ran: a protection that cannot run stops the stage
        problems.append("captions_dedup has not run, so caption and media copies of evaluation samples and media "
                        "duplicates would reach the training manifests: materialize media_hashes, then captions_dedup "
                        "(dagster asset materialize -m mllm_pipeline.definitions --select media_hashes,captions_dedup)")
    else:
        read = {(r["prefix"], r["version"]) for r in dedup.get("inputs") or []}
        if read:
            newer = [s for s in shards if (s.captions["prefix"], s.captions["version"]) not in read]
            if newer:
                problems.append(f"captions_dedup was made from other caption versions than the current ones of "
                                f"{len(newer)} shard(s) (e.g. {newer[0].dataset} {newer[0].key}): materialize captions_dedup")
            if dedup.get("identity", {}).get("media", {}).get("enabled") and any(p.startswith(HASHES_ROOT) for p, _ in read):
                hashed = {p for p, _ in read if p.startswith(HASHES_ROOT)}
                other = [s for s in shards if hashes_prefix(s.dataset, s.key) not in hashed
                         or (storage.current(hashes_prefix(s.dataset, s.key)) or {}).get("media_version") != s.media["version"]
                         or (hashes_prefix(s.dataset, s.key), storage.current(hashes_prefix(s.dataset, s.key))["version"]) not in read]
                if other:
                    problems.append(f"captions_dedup looked for media duplicates in other media than the current media of "
                                    f"{len(other)} shard(s) (e.g. {other[0].dataset} {other[0].key}): materialize "
                                    "media_hashes, then captions_dedup")
    if problems:
        raise InconsistentInputs("the manifests cannot be built from the current upstream outputs; nothing was "
                                 "written. " + "; ".join(problems) + ".")
    return Plan(shards, dedup, missing)


def _ranges(keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    return f"{len(keys)} partitions ({keys[0]} ... {keys[-1]})"


def shard_inputs(storage: Storage, dataset: str, log: Any) -> list[str]:
    """Shards with both committed clean captions and a committed media shard (a warning names the others)."""
    caps = committed_shards(storage, dataset, "captions")
    media = set(committed_shards(storage, dataset, "media"))
    missing = [k for k in caps if k not in media]
    if missing:
        log.warning(f"{dataset}: {len(missing)} shard(s) have clean captions but no media yet (e.g. {missing[0]}); "
                    "materialize their media first")
    return [k for k in caps if k in media]


#: The files a tokenizer is loaded from (transformers' fast and slow tokenizers, sentencepiece models, remote
#: tokenizer code): a model directory's weights are not part of what counts tokens.
TOKENIZER_FILES = frozenset({"special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                             "spiece.model", "sentencepiece.bpe.model", "chat_template.json", "chat_template.jinja"})


def is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.startswith(("tokenizer", "tokenization")) or name.endswith(".tiktoken")


def tokenizer_identity(source: str) -> Any:
    """What the tokenizer is, for the manifests' identity: a local directory by the content of its tokenizer files
    (not the model weights beside them: a release directory is read in milliseconds, not gigabytes), a hub name by
    its name."""
    p = Path(source)
    if not p.is_dir():
        return source
    import xxhash

    return {f.name: xxhash.xxh3_128(f.read_bytes()).hexdigest() for f in sorted(p.iterdir())
            if f.is_file() and is_tokenizer_file(f.name)}


class ConfigError(ValueError):
    """The manifests' configuration cannot be used (a required field is missing, a dataset is unknown)."""


@dataclasses.dataclass
class ManifestsResult:
    committed: dict[str, Any]  # the committed manifest of the manifests version
    summary: dict[str, Any]
    shard_inputs: list[dict[str, Any]]
    seq_lens: Any  # the sequence lengths of this build (None when it was up to date)

    @property
    def up_to_date(self) -> bool:
        return self.seq_lens is None


def materialize_manifests(storage: Storage, *, tokenizer: str, config: ManifestConfig, config_record: dict[str, Any],
                          datasets: list[str] | None, log: Any) -> ManifestsResult:
    """The manifests stage: plan the exact upstream versions, reuse the committed version made from them with this
    config and tokenizer, or build and commit a new one. ``config_record`` is the configuration as the user gave
    it (part of the identity, recorded in the summary)."""
    if not tokenizer:
        raise ConfigError("manifests: config field 'tokenizer' is required: your LLM's tokenizer, a local directory "
                          "(e.g. the model's own directory) or a hub name available offline. The manifests count "
                          "tokens with it, and training must use the same one.")
    named = bool(datasets)
    with_captions = [d for d in DATASET_NAMES if committed_shards(storage, d, "captions")]
    # without datasets named: every dataset with committed raw rows, so one whose shards have no captions yet is
    # reported as missing (plan_inputs), not silently left out
    datasets = datasets or [d for d in DATASET_NAMES if d in with_captions or storage.current(DATASETS[d].raw_prefix)]
    unknown = sorted(set(datasets) - set(DATASET_NAMES))
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}; choose from {list(DATASET_NAMES)}")
    if not with_captions or not set(datasets) & set(with_captions):
        raise ConfigError("no clean captions yet: materialize the captions_<dataset> assets (and their media) first")
    plan = plan_inputs(storage, datasets, log, require_all=named)
    identity = {"stage": "manifests", "code": CODE_VERSION, "inputs": plan.refs(), "config": config_record,
                "tokenizer": tokenizer_identity(tokenizer)}
    committed = storage.up_to_date(PREFIX, identity)
    if committed is not None:
        log.info(f"up to date: {committed['version']} was built from these {len(plan.refs())} upstream versions "
                 "with this config; nothing rebuilt")
        return ManifestsResult(committed, committed["summary"], committed["shard_inputs"], None)
    try:
        tok = load_tokenizer(tokenizer)
    except ValueError as e:
        raise ConfigError(f"manifests: config field 'tokenizer' ({tokenizer}): {e}") from None
    with storage.new_version(PREFIX, identity, inputs=plan.refs()) as version:
        summary, inputs, seq = build_manifests(storage, version, tok, config, plan, log)
        summary["tokenizer"] = tokenizer
        summary["tokenizer_vocab"] = len(tok)
        summary["missing_shards"] = plan.missing
        summary["config"] = config_record
        committed = version.commit({"kind": "manifests", "summary": summary, "shard_inputs": inputs})
    return ManifestsResult(committed, summary, inputs, seq)


def read_raw_for_manifests(uri: str) -> pa.Table:
    """sample_id, split, media_kind, captions of a raw shard, and its question/answer pairs (``qa``) when it has
    them (raw versions written before the column existed have none)."""
    import pyarrow.parquet as pq

    from mllm_pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri)
    with fs.open(path, "rb") as f:
        names = pq.read_schema(f).names
    return read_parquet(uri, columns=["sample_id", "split", "media_kind", "captions"]
                        + [c for c in ("qa", "eval_set") if c in names])


def build_manifests(storage: Storage, version: Version, tok: Any, config: ManifestConfig, plan: Plan,
                    log: Any) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """Write every split's manifest and the LLaVA JSON into ``version`` from exactly the versions in ``plan``.
    Returns the writer's summary, one row per input shard (captions before and after de-duplication, media stored
    and usable) and every sequence length."""
    writer = ManifestWriter(storage, version, tok, config)
    inputs: list[dict[str, Any]] = []
    gone_by_ds: dict[str, Any] = {}
    merged_by_ds: dict[str, pa.Table | None] = {}
    eval_in: dict[tuple[str, str], list[int]] = {}  # (dataset, source split) -> [samples, captions, without media]
    sets_in: dict[tuple[str, str], list[Any]] = {}  # (dataset, declared evaluation set) -> [sample ids, without media]
    for s in plan.shards:
        ds, key = s.dataset, s.key
        if ds not in gone_by_ds:
            drops = dedup_drops(storage, ds, plan.dedup["version"]) if plan.dedup is not None else None
            gone_by_ds[ds] = (pc.binary_join_element_wise(drops["sample_id"], drops["caption_index"].cast(pa.string()), "#")
                              if drops is not None and drops.num_rows else None)
            merged_by_ds[ds] = dedup_merges(storage, ds, plan.dedup["version"]) if plan.dedup is not None else None
        gone = gone_by_ds[ds]
        caps = storage.read_parquet(f"{s.captions['prefix']}/{s.captions['version']}/kept.parquet",
                                    ["sample_id", "caption_index", "caption"])
        n_caps = caps.num_rows
        if gone is not None:
            ids = pc.binary_join_element_wise(caps["sample_id"], caps["caption_index"].cast(pa.string()), "#")
            caps = caps.filter(pc.invert(pc.is_in(ids, gone)))
        media = media_index(storage, ds, key, s.media)
        n_media = media.num_rows
        raw = read_raw_for_manifests(s.raw.uri)
        raw = raw.set_column(1, "split", raw["split"].cast(pa.string())).set_column(2, "media_kind", raw["media_kind"].cast(pa.string()))
        is_eval = pc.is_in(pc.utf8_lower(pc.fill_null(raw["split"], "")), pa.array(list(config.eval_splits)))
        eval_raw = raw.filter(is_eval)
        merged = merged_by_ds.get(ds)
        n_merged = 0
        if merged is not None and merged.num_rows:  # captions moved here from media duplicates
            mine = merged.filter(pc.is_in(merged["sample_id"], media["sample_id"]))
            n_merged = mine.num_rows
            if n_merged:
                caps = pa.concat_tables([caps, mine.select(["sample_id", "caption_index", "caption"]).cast(caps.schema)])
        note = ""
        if ds == "webvid":
            full = media
            media, note = watermark_view(storage, key, media, s.watermark)
            media = _with_eval_media(full, media, eval_raw["sample_id"])
        have = pc.is_in(eval_raw["sample_id"], media["sample_id"]).to_numpy(zero_copy_only=False).astype(bool)
        lens = pc.fill_null(pc.list_value_length(eval_raw["captions"]), 0).to_numpy(zero_copy_only=False)
        for sp, ok, n in zip(eval_raw["split"].to_pylist(), have.tolist(), lens.tolist()):
            e = eval_in.setdefault((ds, sp), [0, 0, 0, 0])
            e[0] += 1
            e[1] += int(n)
            if not ok:
                e[2] += 1
                e[3] += int(n)
        if "eval_set" in eval_raw.column_names:
            for sid, name, ok in zip(eval_raw["sample_id"].to_pylist(), eval_raw["eval_set"].to_pylist(), have.tolist()):
                if name:
                    e = sets_in.setdefault((ds, name), [set(), 0])
                    e[0].add(sid)
                    e[1] += 0 if ok else 1
            raw = raw.drop_columns(["eval_set"])
        writer.add(ds, caps, media, raw.drop_columns(["captions"]))
        inputs.append({"dataset": ds, "shard": key, "captions": n_caps, "after_dedup": caps.num_rows - n_merged,
                       "merged_in": n_merged, "media": n_media, "usable_media": media.num_rows, "note": note})
        log.info(f"[{ds} {key}] {caps.num_rows:,} caption(s) ({n_merged} moved here from media copies), "
                 f"{media.num_rows:,} usable media {note}")
    summary = writer.close()
    summary["eval_splits"] = eval_report(eval_in, writer.eval_out)
    summary["eval_sets"] = eval_set_report(sets_in, writer.eval_out)
    return summary, inputs, writer.seq_len_array()


def eval_set_report(sets_in: dict[tuple[str, str], list[Any]], eval_out: dict[tuple[str, str], list[Any]]) -> list[dict[str, Any]]:
    """Per declared evaluation set (the raw ``eval_set`` column): its samples that came in, those without usable
    media, and those written to the evaluation manifests."""
    out_ids: dict[str, set[str]] = {}
    for (ds, _), (ids, _) in eval_out.items():
        out_ids.setdefault(ds, set()).update(ids)
    return [{"dataset": ds, "eval_set": name, "samples_in": len(ids), "without_media": n_nomedia,
             "samples_out": len(ids & out_ids.get(ds, set())),
             "whole": len(ids & out_ids.get(ds, set())) == len(ids) - n_nomedia}
            for (ds, name), (ids, n_nomedia) in sorted(sets_in.items())]


def _with_eval_media(full: pa.Table, view: pa.Table, eval_ids: pa.ChunkedArray | pa.Array) -> pa.Table:
    """The watermark stage's view of the media, plus any evaluation sample it left out: evaluation splits are never
    reduced by the watermark stage."""
    lost = full.filter(pc.and_(pc.is_in(full["sample_id"], eval_ids), pc.invert(pc.is_in(full["sample_id"], view["sample_id"]))))
    if not lost.num_rows:
        return view
    for name in view.column_names:
        if name not in lost.column_names:
            lost = lost.append_column(name, pa.nulls(lost.num_rows, view.schema.field(name).type))
    return pa.concat_tables([view, lost.select(view.column_names).cast(view.schema)])


def eval_report(eval_in: dict[tuple[str, str], list[int]], eval_out: dict[tuple[str, str], list[Any]]) -> list[dict[str, Any]]:
    """Per evaluation split: samples and captions that came in (the raw rows), those without usable media (failed
    downloads), and those written; ``whole`` says every sample with media arrived with every caption."""
    rows = []
    for (ds, sp), (n_in, c_in, n_nomedia, c_nomedia) in sorted(eval_in.items()):
        ids, c_out = eval_out.get((ds, sp), [set(), 0])
        rows.append({"dataset": ds, "split": sp, "samples_in": n_in, "samples_out": len(ids), "captions_in": c_in,
                     "captions_out": int(c_out), "without_media": n_nomedia,
                     "whole": len(ids) == n_in - n_nomedia and int(c_out) == c_in - c_nomedia})
    return rows
