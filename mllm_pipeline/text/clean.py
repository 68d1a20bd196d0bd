"""Clean the captions of one raw shard: normalise, filter, de-duplicate within the shard, account for every caption."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.text import hashing as H
from mllm_pipeline.text.config import FILTER_ORDER, REASONS, REJECTED_SCHEMA, CleanConfig, kept_schema
from mllm_pipeline.text.dedup import signatures, within_shard
from mllm_pipeline.text.normalize import (
    dedup_keys,
    letter_counts,
    normalize,
    repeated_ngram_fraction,
    word_counts,
)


@dataclasses.dataclass
class ShardCleanResult:
    """The outcome of :func:`clean_shard` for one raw shard.

    ``kept``: one row per kept caption (:func:`mllm_pipeline.text.config.kept_schema`); ``rejected``: one row per
    dropped caption with its reason and a detail (``REJECTED_SCHEMA``); ``counts``: ``rows_in``, ``captions_in``,
    ``captions_kept``, ``captions_rejected``, ``captions_changed`` (kept captions that cleaning changed) and one
    entry per reason (0 included); ``examples``: up to ``n_examples`` kept captions that cleaning changed, as
    ``{"sample_id", "caption_index", "before", "after"}``.
    """

    dataset: str
    kept: pa.Table
    rejected: pa.Table
    counts: dict[str, int]
    examples: list[dict[str, object]]


def _sample_ids(table: pa.Table, what: str) -> pa.Array:
    if "sample_id" not in table.column_names:
        raise ValueError(f"{what}: the table has no 'sample_id' column (columns: {table.column_names})")
    sid = table.column("sample_id").combine_chunks()
    if pa.types.is_dictionary(sid.type):
        sid = sid.dictionary_decode()
    if not (pa.types.is_string(sid.type) or pa.types.is_large_string(sid.type)):
        raise ValueError(f"{what}: 'sample_id' must be a string column, not {sid.type}")
    if sid.null_count:
        row = int(np.flatnonzero(sid.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{what}: 'sample_id' is null in row {row}")
    return sid.cast(pa.string())


def explode_captions(table: pa.Table, what: str) -> tuple[pa.Array, np.ndarray, pa.Array]:
    """One entry per caption of a raw-shard table: (sample_id, caption_index, raw caption), in shard order.

    Accepts the ``captions`` list column of ``BASE_SCHEMA`` or a single string ``caption`` column.
    """
    if not isinstance(table, pa.Table):
        raise ValueError(f"{what}: expected a pyarrow.Table, got {type(table).__name__}")
    sid = _sample_ids(table, what)
    if "captions" in table.column_names:
        caps = table.column("captions").combine_chunks()
        if not (pa.types.is_list(caps.type) or pa.types.is_large_list(caps.type)) or not (
            pa.types.is_string(caps.type.value_type) or pa.types.is_large_string(caps.type.value_type)
        ):
            raise ValueError(f"{what}: 'captions' must be list<string>, not {caps.type}")
        if caps.null_count:
            caps = pc.fill_null(caps, pa.scalar([], caps.type))
        parents = pc.list_parent_indices(caps).to_numpy(zero_copy_only=False).astype(np.int64)
        lens = pc.list_value_length(caps).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else np.zeros(0, np.int64)
        ci = (np.arange(len(parents)) - starts[parents]).astype(np.int32)
        raw = pc.list_flatten(caps).cast(pa.string())
        return sid.take(pa.array(parents)), ci, raw
    if "caption" in table.column_names:
        cap = table.column("caption").combine_chunks()
        if not (pa.types.is_string(cap.type) or pa.types.is_large_string(cap.type)):
            raise ValueError(f"{what}: 'caption' must be a string column, not {cap.type}")
        return sid, np.zeros(len(sid), dtype=np.int32), cap.cast(pa.string())
    raise ValueError(f"{what}: the table has neither a 'captions' (list<string>) nor a 'caption' column "
                     f"(columns: {table.column_names})")


def check_dataset_name(dataset: object) -> str:
    """``dataset`` itself if it is a non-empty string (the name the per-dataset rules are looked up by), else a
    ``ValueError`` naming what was passed. :func:`clean_shard` checks its argument with it."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"clean_shard: dataset must be a non-empty name such as 'cc3m' or 'webvid', got {dataset!r}")
    return dataset


def clean_shard(table: pa.Table, dataset: str, config: CleanConfig | None = None) -> ShardCleanResult:
    """Clean every caption of one raw shard (``BASE_SCHEMA``): normalise, filter, drop duplicates within the shard.

    Duplicates are looked for among the captions of one medium (``config.dedup_scope="medium"``, the default) or of
    the whole shard (``"dataset"``). Captions of rows whose ``split`` is an evaluation split
    (``config.eval_splits``) are normalised but never filtered or de-duplicated: they are all kept.

    Rules and reasons: see :mod:`mllm_pipeline.text`. Every caption ends up in exactly one of ``kept`` and
    ``rejected``; this is checked before returning.
    """
    config = config or CleanConfig()
    dataset = check_dataset_name(dataset)
    sid, ci, raw = explode_captions(table, f"clean_shard({dataset!r})")
    n = len(raw)
    row_of = _caption_rows(table, n)
    protected = _eval_mask(table, row_of, config)  # evaluation captions: never filtered or de-duplicated
    clean = normalize(raw, dataset, config.dataset_rules)
    n_chars = pc.utf8_length(clean).to_numpy(zero_copy_only=False).astype(np.int64)
    n_words = word_counts(clean)

    reason = np.full(n, -1, dtype=np.int64)  # index into ALL_REASONS, -1 = kept so far
    codes = {r: i for i, r in enumerate(REASONS)}
    details: dict[int, str] = {}
    raw_null = raw.is_null().to_numpy(zero_copy_only=False)

    def drop(mask: np.ndarray, name: str) -> np.ndarray:
        hit = mask & (reason < 0) & ~protected
        reason[hit] = codes[name]
        return np.flatnonzero(hit)

    for i in drop(n_chars == 0, "empty_after_cleaning").tolist():
        details[i] = "the caption is null" if raw_null[i] else "nothing is left after cleaning"
    for i in drop((n_words < config.min_words) | (n_chars < config.min_chars), "too_short").tolist():
        details[i] = (f"{n_words[i]} words, {n_chars[i]} characters; needs at least {config.min_words} words "
                      f"and {config.min_chars} characters")
    for i in drop((n_words > config.max_words) | (n_chars > config.max_chars), "too_long").tolist():
        details[i] = (f"{n_words[i]} words, {n_chars[i]} characters; at most {config.max_words} words "
                      f"and {config.max_chars} characters")
    live = np.flatnonzero((reason < 0) & ~protected)
    if len(live):
        sub = clean.take(pa.array(live))
        letters = letter_counts(sub)
        nonspace = n_chars[live] - (n_words[live] - 1)
        frac = letters / nonspace
        for k in drop_at(live, frac < config.min_letter_fraction, reason, codes["mostly_non_letters"]).tolist():
            details[int(live[k])] = (f"{letters[k]} letters of {nonspace[k]} non-space characters "
                                     f"({frac[k]:.2f} < {config.min_letter_fraction})")
        rep = repeated_ngram_fraction(sub, config.repeat_ngram_size)
        for k in drop_at(live, rep >= config.max_repeated_ngram_fraction, reason, codes["repeated_ngrams"]).tolist():
            details[int(live[k])] = (f"{rep[k]:.2f} of its word {config.repeat_ngram_size}-grams are repeats "
                                     f"(>= {config.max_repeated_ngram_fraction})")
    if config.language_backend != "off":
        from mllm_pipeline.text.language import language_verdicts

        live = np.flatnonzero((reason < 0) & ~protected)
        verdicts = language_verdicts(clean.take(pa.array(live)).to_pylist(), config)
        for k, v in enumerate(verdicts):
            if v is not None:
                reason[live[k]] = codes["language"]
                details[int(live[k])] = v

    # duplicates within the shard (within one medium by default), among the training captions that passed every filter
    pool = np.flatnonzero((reason < 0) & ~protected)
    keys = dedup_keys(clean.take(pa.array(pool)))
    ws = within_shard(keys, config, row_of[pool] if config.dedup_scope == "medium" else None)
    for k in np.flatnonzero(ws.exact_of >= 0).tolist():
        j = int(pool[ws.exact_of[k]])
        reason[pool[k]] = codes["exact_duplicate"]
        details[int(pool[k])] = f"same as {sid[j].as_py()}[{ci[j]}]"
    for k in np.flatnonzero(ws.near_of >= 0).tolist():
        j = int(pool[ws.near_of[k]])
        reason[pool[k]] = codes["near_duplicate"]
        details[int(pool[k])] = f"near {sid[j].as_py()}[{ci[j]}] (jaccard {ws.near_eq[k] / config.num_perm:.2f})"

    # kept: exact-unique pool captions that are not near duplicates, and every evaluation caption, in shard order
    kept_local = np.flatnonzero(ws.near_of[ws.uniq] < 0)  # positions within uniq
    kept_pool = ws.uniq[kept_local]
    kept_rows = pool[kept_pool]
    kept_keys = keys.take(pa.array(kept_pool))
    sigs = ws.sigs[kept_local]
    ev = np.flatnonzero(protected)
    if len(ev):
        ev_keys = dedup_keys(clean.take(pa.array(ev)))
        order = np.argsort(np.concatenate([kept_rows, ev]), kind="stable")
        kept_rows = np.concatenate([kept_rows, ev])[order]
        kept_keys = pa.concat_arrays([kept_keys.cast(pa.string()), ev_keys.cast(pa.string())]).take(pa.array(order))
        sigs = np.concatenate([sigs, signatures(ev_keys, config)])[order]
    take = pa.array(kept_rows, pa.int64())
    kept = pa.table(
        {
            "sample_id": sid.take(take),
            "caption_index": pa.array(ci[kept_rows], pa.int32()),
            "caption": clean.take(take),
            "caption_raw": raw.take(take),
            "n_words": pa.array(n_words[kept_rows], pa.int32()),
            "n_chars": pa.array(n_chars[kept_rows], pa.int32()),
            "dedup_hash": pa.array(H.hash_strings(kept_keys, config.seed), pa.uint64()),
            "minhash": pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1), pa.uint32()), config.num_perm),
        },
        schema=kept_schema(config.num_perm),
    )
    rej_rows = np.flatnonzero(reason >= 0)
    names = list(REASONS)
    rtake = pa.array(rej_rows, pa.int64())
    rejected = pa.table(
        {
            "sample_id": sid.take(rtake),
            "caption_index": pa.array(ci[rej_rows], pa.int32()),
            "caption_raw": raw.take(rtake),
            "caption_clean": clean.take(rtake),
            "reason": pa.array([names[c] for c in reason[rej_rows].tolist()], pa.string()),
            "detail": pa.array([details[i] for i in rej_rows.tolist()], pa.string()),
        },
        schema=REJECTED_SCHEMA,
    )
    changed = pc.not_equal(kept.column("caption"), pc.fill_null(kept.column("caption_raw"), ""))
    changed_np = changed.to_numpy(zero_copy_only=False).astype(bool)
    examples = []
    for i in np.flatnonzero(changed_np)[: config.n_examples].tolist():
        examples.append({"sample_id": kept.column("sample_id")[i].as_py(),
                         "caption_index": kept.column("caption_index")[i].as_py(),
                         "before": kept.column("caption_raw")[i].as_py(), "after": kept.column("caption")[i].as_py()})
    counts: dict[str, int] = {"rows_in": table.num_rows, "captions_in": n, "eval_captions": int(protected.sum()),
                              "captions_kept": kept.num_rows,
                              "captions_rejected": rejected.num_rows, "captions_changed": int(changed_np.sum())}
    hist = np.bincount(reason[rej_rows], minlength=len(names))
    counts.update({r: int(hist[i]) for i, r in enumerate(names)})
    if kept.num_rows + rejected.num_rows != n or sum(int(h) for h in hist) != rejected.num_rows:
        raise AssertionError(f"clean_shard({dataset!r}): caption accounting broken: {counts}")
    return ShardCleanResult(dataset, kept, rejected, counts, examples)


def _caption_rows(table: pa.Table, n: int) -> np.ndarray:
    """The row (medium) of each caption, in :func:`explode_captions` order."""
    if "captions" not in table.column_names:
        return np.arange(n, dtype=np.int64)
    lens = pc.fill_null(pc.list_value_length(table.column("captions")), 0).to_numpy(zero_copy_only=False)
    return np.repeat(np.arange(table.num_rows, dtype=np.int64), lens.astype(np.int64))


def _eval_mask(table: pa.Table, row_of: np.ndarray, config: CleanConfig) -> np.ndarray:
    """Captions of rows whose ``split`` is one of ``config.eval_splits``."""
    if "split" not in table.column_names or not config.eval_splits or not len(row_of):
        return np.zeros(len(row_of), dtype=bool)
    split = pc.utf8_lower(pc.fill_null(table.column("split").cast(pa.string()), ""))
    rows = pc.is_in(split, pa.array(list(config.eval_splits))).to_numpy(zero_copy_only=False).astype(bool)
    return rows[row_of]


def drop_at(live: np.ndarray, mask: np.ndarray, reason: np.ndarray, code: int) -> np.ndarray:
    """Mark ``live[k]`` rejected with ``code`` where ``mask[k]`` and it is not rejected yet; return those k."""
    hit = mask & (reason[live] < 0)
    reason[live[hit]] = code
    return np.flatnonzero(hit)


__all__ = ["ShardCleanResult", "check_dataset_name", "clean_shard", "explode_captions", "FILTER_ORDER"]
