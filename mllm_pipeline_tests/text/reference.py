"""A plain per-caption Python implementation of exactly the rules of :func:`clean_shard` and :func:`dedup_across`.

It exists to prove the vectorised code right (tests and ``bench/captions_bench.py`` compare the two, row for row,
including signatures and details) and as a readable statement of the rules. It applies every rule to every string
(no triggers, no subsets), uses Python's :mod:`re`, :mod:`unicodedata`, ``str.isalpha``, dicts and sets, and
computes hashes and MinHash with Python integers. It is slow on purpose; do not use it in a pipeline.

Known, documented difference: the vectorised letter count uses RE2's ``\\pL`` and NFKC uses utf8proc, while this
module uses Python's ``str.isalpha`` and ``unicodedata``; they can disagree only on characters assigned in a newer
Unicode version than Python's.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from mllm_pipeline.text import hashing as H
from mllm_pipeline.text import rules as R
from mllm_pipeline.text.clean import ShardCleanResult, check_dataset_name, explode_captions
from mllm_pipeline.text.config import REASONS, REJECTED_SCHEMA, CleanConfig, kept_schema


def _sub_all(s: str, rules: Sequence[R.Rule]) -> str:
    for rule in rules:
        s = rule.python.sub(rule.replacement, s)
    return s


def normalize_one(s: str | None, dataset: str | None, dataset_rules: bool = True) -> str:
    """Clean one caption (None becomes "")."""
    s = "" if s is None else s
    s = R.fix_mojibake(s)
    s = R.unescape_entities(s)
    s = _sub_all(s, R.HTML_TAGS.rules)
    s = unicodedata.normalize("NFKC", s)
    s = _sub_all(s, R.CONTROLS.rules)
    s = _sub_all(s, R.URLS_EMAILS.rules)
    if dataset_rules and dataset is not None:
        for group in R.DATASET_RULES.get(dataset, ()):
            s = _sub_all(s, group.rules)
    s = _sub_all(s, R.REPEATED_PUNCTUATION.rules)
    s = _sub_all(s, R.EMPTY_BRACKETS.rules)
    s = R.MULTI_SPACE.python.sub(R.MULTI_SPACE.replacement, s)
    return s.strip(" ")


def n_words_of(clean: str) -> int:
    return len(clean.split(" ")) if clean else 0


def repeated_fraction_one(clean: str, n: int) -> float:
    words = clean.translate(R.ASCII_LOWER).split(" ")
    total = len(words) - n + 1
    if total < 2:
        return 0.0
    distinct = len({tuple(words[i:i + n]) for i in range(total)})
    return (total - distinct) / total


def signature_one(key: str, config: CleanConfig) -> list[int]:
    n = config.effective_shingle_size
    if config.shingle == "word":
        sh = H.word_shingles_py(key, n, config.seed)
    else:
        sh = H.char_shingles_py(key, n, config.seed)
    return H.minhash_py(sh, config.num_perm, config.seed)


def _filter_one(clean: str, raw_is_null: bool, config: CleanConfig) -> tuple[str, str] | None:
    """(reason, detail) of the first filter that fires, or None."""
    c = len(clean)
    w = n_words_of(clean)
    if c == 0:
        return "empty_after_cleaning", "the caption is null" if raw_is_null else "nothing is left after cleaning"
    if w < config.min_words or c < config.min_chars:
        return "too_short", (f"{w} words, {c} characters; needs at least {config.min_words} words "
                             f"and {config.min_chars} characters")
    if w > config.max_words or c > config.max_chars:
        return "too_long", (f"{w} words, {c} characters; at most {config.max_words} words "
                            f"and {config.max_chars} characters")
    letters = sum(1 for ch in clean if ch.isalpha())
    nonspace = c - (w - 1)
    frac = letters / nonspace
    if frac < config.min_letter_fraction:
        return "mostly_non_letters", (f"{letters} letters of {nonspace} non-space characters "
                                      f"({frac:.2f} < {config.min_letter_fraction})")
    rep = repeated_fraction_one(clean, config.repeat_ngram_size)
    if rep >= config.max_repeated_ngram_fraction:
        return "repeated_ngrams", (f"{rep:.2f} of its word {config.repeat_ngram_size}-grams are repeats "
                                   f"(>= {config.max_repeated_ngram_fraction})")
    if config.language_backend != "off":
        from mllm_pipeline.text.language import language_verdicts

        v = language_verdicts([clean], config)[0]
        if v is not None:
            return "language", v
    return None


def _near_match(sig: list[int], bkeys: list[int], buckets: list[dict[int, list[int]]], sigs: list[list[int]],
                config: CleanConfig) -> tuple[int, int] | None:
    """Earliest (ordinal, equal count) among bucket-mates whose Jaccard estimate reaches the threshold."""
    cands: set[int] = set()
    for b, key in enumerate(bkeys):
        cands.update(buckets[b].get(key, ()))
    for c in sorted(cands):
        eq = sum(1 for x, y in zip(sig, sigs[c]) if x == y)
        if eq / config.num_perm >= config.near_dup_threshold:
            return c, eq
    return None


def clean_shard_reference(table: pa.Table, dataset: str, config: CleanConfig | None = None) -> ShardCleanResult:
    """The same result as :func:`mllm_pipeline.text.clean_shard`, computed caption by caption."""
    config = config or CleanConfig()
    dataset = check_dataset_name(dataset)
    sid_arr, ci_arr, raw_arr = explode_captions(table, f"clean_shard({dataset!r})")
    sids, cis, raws = sid_arr.to_pylist(), [int(x) for x in ci_arr], raw_arr.to_pylist()
    n = len(raws)
    cleans = [normalize_one(r, dataset, config.dataset_rules) for r in raws]
    # the row (medium) of each caption, and whether that row belongs to an evaluation split
    lists = table.column("captions").to_pylist() if "captions" in table.column_names else [[None]] * table.num_rows
    row_of = [r for r, caps in enumerate(lists) for _ in (caps or [])]
    splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * table.num_rows
    protected = [str(splits[r] or "").lower() in config.eval_splits for r in row_of]
    verdict: list[tuple[str, str] | None] = [None if p else _filter_one(c, r is None, config)
                                             for c, r, p in zip(cleans, raws, protected)]

    first_by_key: dict[tuple[int, str], int] = {}
    keys: dict[int, str] = {}
    sig_of: dict[int, list[int]] = {}
    buckets_of: dict[int, list[dict[int, list[int]]]] = {}  # per medium (or one for the whole shard)
    for i in range(n):
        if protected[i]:
            keys[i] = R.dedup_text(cleans[i])
            sig_of[i] = signature_one(keys[i], config)
            continue
        if verdict[i] is not None:
            continue
        scope = row_of[i] if config.dedup_scope == "medium" else -1
        buckets = buckets_of.setdefault(scope, [{} for _ in range(config.lsh_bands)])
        key = R.dedup_text(cleans[i])
        keys[i] = key
        if config.exact_dedup:
            if (scope, key) in first_by_key:
                j = first_by_key[(scope, key)]
                verdict[i] = ("exact_duplicate", f"same as {sids[j]}[{cis[j]}]")
                continue
            first_by_key[(scope, key)] = i
        sig = signature_one(key, config)
        sig_of[i] = sig
        if config.near_dedup:
            bkeys = H.band_keys_py(sig, config.lsh_bands, config.lsh_rows)
            hit = _near_match(sig, bkeys, buckets, sig_of, config)  # type: ignore[arg-type]
            for b, k in enumerate(bkeys):
                buckets[b].setdefault(k, []).append(i)
            if hit is not None:
                j, eq = hit
                verdict[i] = ("near_duplicate", f"near {sids[j]}[{cis[j]}] (jaccard {eq / config.num_perm:.2f})")

    kept_rows = [i for i in range(n) if verdict[i] is None]
    kept = pa.table(
        {
            "sample_id": [sids[i] for i in kept_rows],
            "caption_index": [cis[i] for i in kept_rows],
            "caption": [cleans[i] for i in kept_rows],
            "caption_raw": [raws[i] for i in kept_rows],
            "n_words": [n_words_of(cleans[i]) for i in kept_rows],
            "n_chars": [len(cleans[i]) for i in kept_rows],
            "dedup_hash": [H.hash_string_py(keys[i], config.seed) for i in kept_rows],
            "minhash": [sig_of[i] for i in kept_rows],
        },
        schema=kept_schema(config.num_perm),
    )
    rej_rows = [i for i in range(n) if verdict[i] is not None]
    rejected = pa.table(
        {
            "sample_id": [sids[i] for i in rej_rows],
            "caption_index": [cis[i] for i in rej_rows],
            "caption_raw": [raws[i] for i in rej_rows],
            "caption_clean": [cleans[i] for i in rej_rows],
            "reason": [verdict[i][0] for i in rej_rows],  # type: ignore[index]
            "detail": [verdict[i][1] for i in rej_rows],  # type: ignore[index]
        },
        schema=REJECTED_SCHEMA,
    )
    changed = [i for i in kept_rows if cleans[i] != (raws[i] or "")]
    counts: dict[str, int] = {"rows_in": table.num_rows, "captions_in": n, "eval_captions": sum(protected),
                              "captions_kept": len(kept_rows),
                              "captions_rejected": len(rej_rows), "captions_changed": len(changed)}
    counts.update({r: 0 for r in REASONS})
    for i in rej_rows:
        counts[verdict[i][0]] += 1  # type: ignore[index]
    assert len(kept_rows) + len(rej_rows) == n
    examples = [{"sample_id": sids[i], "caption_index": cis[i], "before": raws[i], "after": cleans[i]}
                for i in changed[: config.n_examples]]
    return ShardCleanResult(dataset, kept, rejected, counts, examples)


class _RefStore:
    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self.exact: dict[int, int] = {}
        self.buckets: list[dict[int, list[int]]] = [{} for _ in range(config.lsh_bands)]
        self.sigs: list[list[int]] = []
        self.refs: list[tuple[str, int, str]] = []

    def add(self, sid: str, ci: int, h: int, sig: list[int], label: str) -> None:
        o = len(self.sigs)
        self.exact.setdefault(h, o)
        for b, k in enumerate(H.band_keys_py(sig, self.config.lsh_bands, self.config.lsh_rows)):
            self.buckets[b].setdefault(k, []).append(o)
        self.sigs.append(sig)
        self.refs.append((sid, ci, label))

    def near(self, sig: list[int]) -> tuple[int, int] | None:
        bkeys = H.band_keys_py(sig, self.config.lsh_bands, self.config.lsh_rows)
        return _near_match(sig, bkeys, self.buckets, self.sigs, self.config)


def dedup_across_reference(
    shards: Iterable[Any], eval_captions: Mapping[str, pa.Table | Sequence[str]] | None = None,
    config: CleanConfig | None = None,
) -> list[pa.Table]:
    """The same per-shard drop tables as :func:`mllm_pipeline.text.dedup_across`, caption by caption."""
    config = config or CleanConfig()
    P = config.num_perm
    ev = _RefStore(config)
    for name, caps in (eval_captions or {}).items():
        if isinstance(caps, pa.Table):
            sid_arr, ci_arr, raw_arr = explode_captions(caps, f"evaluation split {name!r}")
            items = zip(sid_arr.to_pylist(), [int(x) for x in ci_arr], raw_arr.to_pylist())
        else:
            items = ((str(i), 0, c) for i, c in enumerate(caps))
        for sid, ci, raw in items:
            clean = normalize_one(raw, None, config.dataset_rules)
            if not clean:
                continue
            key = R.dedup_text(clean)
            ev.add(sid, ci, H.hash_string_py(key, config.seed), signature_one(key, config), name)
    tr = _RefStore(config)
    out = []
    for pos, item in enumerate(shards):
        label = str(pos)
        if isinstance(item, tuple) and len(item) == 2:
            label, item = str(item[0]), item[1]
        kept = getattr(item, "kept", item)
        rows = kept.to_pylist()
        drops = []
        for r in rows:  # the kept table's own hash and signature, as the vectorised index uses them
            h, sig = r["dedup_hash"], r["minhash"]
            why = None
            if h in ev.exact:
                sid, ci, lab = ev.refs[ev.exact[h]]
                why = ("eval_leak", f"exact copy of eval caption {lab}:{sid}[{ci}]")
            elif (hit := ev.near(sig)) is not None:
                sid, ci, lab = ev.refs[hit[0]]
                why = ("eval_leak", f"near copy of eval caption {lab}:{sid}[{ci}] (jaccard {hit[1] / P:.2f})")
            elif config.exact_dedup and config.dedup_scope == "dataset" and h in tr.exact:
                sid, ci, lab = tr.refs[tr.exact[h]]
                why = ("exact_duplicate", f"same as {sid}[{ci}] in shard {lab}")
            elif config.near_dedup and config.dedup_scope == "dataset" and (hit := tr.near(sig)) is not None:
                sid, ci, lab = tr.refs[hit[0]]
                why = ("near_duplicate", f"near {sid}[{ci}] in shard {lab} (jaccard {hit[1] / P:.2f})")
            if why is not None:
                drops.append({"sample_id": r["sample_id"], "caption_index": r["caption_index"],
                              "caption_raw": r["caption_raw"], "caption_clean": r["caption"],
                              "reason": why[0], "detail": why[1]})
        for r in rows:
            tr.add(r["sample_id"], r["caption_index"], r["dedup_hash"], r["minhash"], label)
        out.append(pa.Table.from_pylist(drops, schema=REJECTED_SCHEMA))
    return out
