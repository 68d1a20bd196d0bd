"""Vectorised caption normalisation and measures on Arrow string arrays (pyarrow.compute + numpy).

Per-string Python runs only where a vectorised test says it may be needed: ``ftfy`` on rows that are not ASCII,
``html.unescape`` on rows that hold a character reference. Every regex rule group runs only on the rows its
trigger matches (see :mod:`mllm_pipeline.text.rules`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mllm_pipeline.text import rules as R

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _mask_np(mask: pa.Array) -> np.ndarray:
    return mask.to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _on_subset(arr: pa.Array, mask: np.ndarray, fn: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """``arr`` with ``fn`` applied to the rows where ``mask`` is true (all other rows untouched)."""
    n_true = int(mask.sum())
    if n_true == 0:
        return arr
    if n_true == len(arr):
        return fn(arr)
    idx = np.flatnonzero(mask)
    new = fn(arr.take(pa.array(idx)))
    return pc.replace_with_mask(arr, pa.array(mask), new)


def _python_map(arr: pa.Array, mask: np.ndarray, fn: Callable[[str], str]) -> pa.Array:
    return _on_subset(arr, mask, lambda sub: pa.array([fn(s) for s in sub.to_pylist()], type=pa.string()))


def _apply_rules(arr: pa.Array, rules: Sequence[R.Rule]) -> pa.Array:
    for rule in rules:
        arr = pc.replace_substring_regex(arr, rule.re2, rule.replacement)
    return arr


def apply_group(arr: pa.Array, group: R.RuleGroup) -> pa.Array:
    if not group.trigger:
        return _apply_rules(arr, group.rules)
    mask = _mask_np(pc.match_substring_regex(arr, group.trigger_re2))
    return _on_subset(arr, mask, lambda sub: _apply_rules(sub, group.rules))


def not_ascii(arr: pa.Array) -> np.ndarray:
    return ~_mask_np(pc.string_is_ascii(arr))


# ---------------------------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------------------------


def normalize(arr: pa.Array, dataset: str | None, dataset_rules: bool = True) -> pa.Array:
    """Clean every caption of ``arr`` (a string array; nulls become ""). Same result as
    ``mllm_pipeline_tests.text.reference.normalize_one`` on each string."""
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.fill_null(arr, "")
    # 1. mojibake: ftfy, only for rows with a non-ASCII character
    arr = _python_map(arr, not_ascii(arr), R.fix_mojibake)
    # 2. HTML character references, only where one occurs
    arr = _python_map(arr, _mask_np(pc.match_substring_regex(arr, R.ENTITY_PATTERN)), R.unescape_entities)
    # 3. tags
    arr = apply_group(arr, R.HTML_TAGS)
    # 4. NFKC (the identity on ASCII, so only non-ASCII rows)
    arr = _on_subset(arr, not_ascii(arr), lambda sub: pc.utf8_normalize(sub, "NFKC"))
    # 5.-6. controls and invisibles, URLs and e-mail addresses
    arr = apply_group(arr, R.CONTROLS)
    arr = apply_group(arr, R.URLS_EMAILS)
    # 7. dataset rules
    if dataset_rules and dataset is not None:
        for group in R.DATASET_RULES.get(dataset, ()):
            arr = apply_group(arr, group)
    # 8.-10. repeated punctuation, empty brackets, spaces
    arr = apply_group(arr, R.REPEATED_PUNCTUATION)
    arr = apply_group(arr, R.EMPTY_BRACKETS)
    arr = pc.replace_substring_regex(arr, R.MULTI_SPACE.re2, R.MULTI_SPACE.replacement)
    return pc.utf8_trim(arr, " ")


_PUNCT = r"!-/:-@\[-`{-~"
#: Runs of spaces and ASCII punctuation that hold at least one punctuation mark. On cleaned text (single spaces)
#: replacing only these gives the result of :data:`rules.DEDUP_PUNCT` while leaving plain spaces alone.
_PUNCT_RUN = f"[ {_PUNCT}]*[{_PUNCT}][ {_PUNCT}]*"


def dedup_keys(clean: pa.Array) -> pa.Array:
    """The duplicate key of every cleaned caption (see :func:`mllm_pipeline.text.rules.dedup_text`)."""
    low = pc.ascii_lower(clean)
    mask = _mask_np(pc.match_substring_regex(low, f"[{_PUNCT}]"))
    low = _on_subset(low, mask, lambda sub: pc.utf8_trim(pc.replace_substring_regex(sub, _PUNCT_RUN, " "), " "))
    return low


# ---------------------------------------------------------------------------------------------------------------
# measures
# ---------------------------------------------------------------------------------------------------------------

_ASCII_LETTER = np.zeros(256, dtype=np.int64)
_ASCII_LETTER[ord("A"): ord("Z") + 1] = 1
_ASCII_LETTER[ord("a"): ord("z") + 1] = 1


def word_counts(clean: pa.Array) -> np.ndarray:
    """Words = space-separated tokens of the cleaned caption (spaces are single and trimmed); 0 for ""."""
    spaces = pc.count_substring(clean, " ").to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.binary_length(clean).to_numpy(zero_copy_only=False)
    return np.where(lengths > 0, spaces + 1, 0)


def letter_counts(clean: pa.Array) -> np.ndarray:
    """Unicode letters (category L*) per caption: a byte table for ASCII rows, RE2 ``\\pL`` for the others."""
    from mllm_pipeline.text.hashing import _buffers, _segment_sum

    offsets, data = _buffers(clean)
    counts = _segment_sum(_ASCII_LETTER[data].astype(np.uint64), offsets).astype(np.int64)
    na = not_ascii(clean)
    if na.any():
        idx = np.flatnonzero(na)
        sub = clean.take(pa.array(idx))
        total = pc.utf8_length(sub).to_numpy(zero_copy_only=False)
        rest = pc.utf8_length(pc.replace_substring_regex(sub, r"\pL+", "")).to_numpy(zero_copy_only=False)
        counts[idx] = total - rest
    return counts


def repeated_ngram_fraction(clean: pa.Array, n: int, seed: int = 1) -> np.ndarray:
    """``1 - distinct / total`` word n-grams (ASCII lower-case words) per caption; 0 where there are < 2 n-grams.

    Words and n-grams are compared by 64-bit hash (a false "repeat" needs a hash collision, about 2**-64 a pair).
    """
    from mllm_pipeline.text.hashing import _mults, hash_ranges, split_spaces, splitmix64_np

    m = len(clean)
    out = np.zeros(m, dtype=np.float64)
    if m == 0:
        return out
    data, ws, wl, counts = split_spaces(pc.ascii_lower(clean))
    n_grams = counts - n + 1
    cand = n_grams >= 2
    if not cand.any():
        return out
    wh = hash_ranges(data, ws, wl, seed)
    offs = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(counts, out=offs[1:])
    owner = np.repeat(np.arange(m), counts)
    pos = np.arange(len(wh)) - offs[:-1][owner]
    starts = np.flatnonzero((pos + n <= counts[owner]) & cand[owner])
    mults = _mults(n + 1)
    with np.errstate(over="ignore"):
        key = owner[starts].astype(np.uint64) * mults[n]
        for k in range(n):
            key += wh[starts + k] * mults[k]
    first = np.unique(splitmix64_np(key), return_index=True)[1]
    distinct = np.bincount(owner[starts][first], minlength=m)
    total = np.where(cand, n_grams, 1)
    out[cand] = (total[cand] - distinct[cand]) / total[cand]
    return out
