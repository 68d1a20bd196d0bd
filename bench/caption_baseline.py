"""A strong baseline for caption cleaning, written the way a data engineer would without this project: pandas
string operations (pyarrow-backed strings, vectorised regexes) for normalisation and the filters, and rensa (a
maintained Rust MinHash with LSH) for near copies of evaluation captions.

It implements the same kinds of rules with the same thresholds (DataComp's length rule, letter share, repeated
bigrams, exact and MinHash near copies of evaluation captions at Jaccard 0.8 on word bigrams); it is not bit-for-bit
the project's output (different hash functions, a simpler entity / mojibake handling), so the benchmark reports
how many captions each keeps, not an equality.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import pyarrow as pa

URL = r"(?:https?://|www\.)\S+"
EMAIL = r"[\w.+-]+@[\w-]+\.[\w.-]+"
TAG = r"</?[A-Za-z][^<>]{0,200}>"


def normalize(s: pd.Series) -> pd.Series:
    amp = s.str.contains("&", regex=False)
    if amp.any():  # html.unescape only where there is an entity
        s = s.copy()
        s[amp] = s[amp].map(html.unescape)
    non_ascii = s.str.contains(r"[^\x00-\x7f]", regex=True)
    if non_ascii.any():
        import ftfy

        s[non_ascii] = s[non_ascii].map(ftfy.fix_text)
    s = (s.str.replace(TAG, " ", regex=True).str.replace(URL, " ", regex=True).str.replace(EMAIL, " ", regex=True)
         .str.normalize("NFKC").str.replace(r"[\x00-\x1f\x7f\x{200b}-\x{200f}\x{2060}\x{feff}]", " ", regex=True)
         .str.replace(r"([!?.,;:])\1+", r"\1", regex=True).str.replace(r"\s+", " ", regex=True).str.strip())
    return s


def repeated_bigram_share(words: pd.Series) -> np.ndarray:
    out = np.zeros(len(words))
    for i, w in enumerate(words):
        if len(w) >= 3:
            grams = list(zip(w, w[1:]))
            out[i] = 1 - len(set(grams)) / len(grams)
    return out


def dedup_key(s: pd.Series) -> pd.Series:
    return s.str.lower().str.replace(r"[^\w\s]", "", regex=True).str.replace(r"\s+", " ", regex=True).str.strip()


def minhashes(keys: pd.Series, num_perm: int = 64, seed: int = 1) -> list:
    from rensa import RMinHash

    out = []
    for k in keys:
        w = k.split()
        m = RMinHash(num_perm=num_perm, seed=seed)
        m.update([f"{a} {b}" for a, b in zip(w, w[1:])] or w or [""])
        out.append(m)
    return out


class EvalIndex:
    """Exact keys and a rensa LSH of the evaluation captions."""

    def __init__(self, captions: list[str], num_perm: int = 64, bands: int = 8, threshold: float = 0.8):
        from rensa import RMinHashLSH

        keys = dedup_key(normalize(pd.Series(captions, dtype="string[pyarrow]")).fillna(""))
        self.exact = set(keys.tolist())
        self.lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
        self.sigs = minhashes(keys, num_perm)
        for i, m in enumerate(self.sigs):
            self.lsh.insert(i, m)
        self.threshold = threshold

    def leaks(self, keys: pd.Series) -> np.ndarray:
        hit = keys.isin(self.exact).to_numpy()
        for i, m in enumerate(minhashes(keys)):
            if not hit[i] and any(m.jaccard(self.sigs[j]) >= self.threshold for j in self.lsh.query(m)):
                hit[i] = True
        return hit


def clean_captions(captions: pa.Array, index: EvalIndex) -> dict[str, int]:
    """Normalise, filter and drop evaluation copies of one shard's captions; counts per outcome."""
    s = normalize(pd.Series(captions.to_pandas(types_mapper=pd.ArrowDtype)).astype("string[pyarrow]").fillna(""))
    n_chars = s.str.len().to_numpy()
    words = s.str.split()
    n_words = words.str.len().to_numpy()
    letters = s.str.count(r"[^\W\d_]").to_numpy()
    nonspace = n_chars - np.maximum(n_words - 1, 0)
    empty = n_chars == 0
    short = ~empty & ((n_words < 3) | (n_chars < 6))
    long_ = ~empty & ~short & ((n_words > 256) | (n_chars > 2048))
    live = ~(empty | short | long_)
    letters_low = live & (letters / np.maximum(nonspace, 1) < 0.5)
    live &= ~letters_low
    rep = np.zeros(len(s))
    rep[live] = repeated_bigram_share(words[live])
    repeated = live & (rep >= 0.5)
    live &= ~repeated
    keys = dedup_key(s[live])
    leak = np.zeros(len(s), dtype=bool)
    leak[np.flatnonzero(live)] = index.leaks(keys)
    return {"captions_in": len(s), "kept": int((live & ~leak).sum()), "empty": int(empty.sum()),
            "too_short": int(short.sum()), "too_long": int(long_.sum()), "mostly_non_letters": int(letters_low.sum()),
            "repeated_ngrams": int(repeated.sum()), "eval_leak": int(leak.sum())}
