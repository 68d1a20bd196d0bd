"""Reproducible noisy CC3M-like captions for the tests and ``bench/captions_bench.py`` (vectorised: millions/s).

CC3M captions are lower-case, hypernymised ("actor attends the premiere of the film"), about 10 words. On top of
clean captions this injects, at fixed rates: HTML entities and tags, URLs and e-mail addresses, mojibake, control
and invisible characters, repeated punctuation, accented words, exact duplicates (some differing only in case and
punctuation), near duplicates (one word added), too-short, non-letter and repetitive captions, and copies of
evaluation captions. ``noisy_captions(n, seed)`` always returns the same strings for the same arguments.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

WORDS = (
    "a the of in on with and at for to from during by an his her their its this that is are was "
    "person actor man woman people young old little child children boy girl family couple friends team "
    "dog cat horse bird animal tree trees flower flowers forest park garden field grass water river lake sea "
    "ocean beach sand island mountain mountains hill rock sky clouds sun sunset sunrise night light snow "
    "winter summer autumn spring rain city street road building house home room kitchen table chair window "
    "door wall floor bed car bus train plane boat bike bridge tower church castle village town country "
    "view background texture pattern design illustration vector image photo cartoon icon logo "
    "white black red blue green yellow orange pink purple brown grey golden silver colorful beautiful "
    "large small big new modern traditional vintage ancient abstract isolated close top front side "
    "walking running sitting standing playing looking holding wearing smiling eating drinking working "
    "attends arrives performs poses premiere event award ceremony festival concert game match "
    "football player season league stage show film series episode fashion dress shirt hat shoes style "
    "food dish fruit vegetables cake coffee wine glass bottle plate hand hands face hair eyes portrait "
    "business office computer phone book paper money map flag sign christmas wedding party birthday holiday "
    "hotel restaurant shop market museum gallery art artist painting sculpture statue monument temple "
    "politician soccer basketball tennis golf race athlete runner swimmer person's actor's woman's"
).split()

MOJIBAKE = ["cafÃ©", "naÃ¯ve", "crÃ¨me brÃ»lÃ©e", "â€œquotedâ€\x9d", "itâ€™s", "SÃ£o Paulo", "MÃ¼nchen", "dÃ©cor"]
ACCENTED = ["café", "naïve", "crème brûlée", "São Paulo", "München", "décor", "Zürich", "señor"]
ENTITIES = ["&amp;", "&quot;", "&#39;", "&nbsp;", "&lt;b&gt;", "&amp;amp;", "&eacute;", "&#x2014;", "&copy;"]
TAGS = [("<b>", "</b>"), ("<i>", "</i>"), ("<a href='http://example.com/x'>", "</a>"), ("<span class=\"c\">", "</span>"),
        ("<br>", ""), ("<br/>", "")]
URLS = ["http://example.com/photos/", "https://www.flickr.com/photos/user/", "www.shop-example.co.uk/item/",
        "HTTPS://cdn.example.org/img?id=", "ftp://files.example.net/pub/"]
EMAILS = ["contact@example.com", "photo.studio+press@mail.example.co.uk", "info@shop-example.org"]
NOISE_CHARS = ["\t", "\n", "\r\n", "\u00a0", "\u200b", "\ufeff", "\u00ad", "  ", "\u3000", "\x07"]
PUNCT = ["!!!", "????", "....", ",,", "!!!!!!", "---", "***", " ... "]
SHORT = ["sunset", "a dog", "red car", "hi", "beach view", "person", "wow!!!", "  ", ""]
NON_LETTER = ["1234 5678 9012", "# # # 2019 ###", "12/05/2018 14:32 :)", "$$$ 99.99 $$$", "IMG_2034 DSC_0042 0001"]
REPEATS = ["buy now buy now buy now buy now", "sale sale sale sale sale", "best price best price best price here",
           "click here click here click here"]

#: Share of captions that receive each kind of noise (a caption can receive several).
RATES = {
    "html_entity": 0.02, "html_tag": 0.01, "url": 0.02, "email": 0.005, "mojibake": 0.01, "accented": 0.01,
    "noise_chars": 0.02, "punctuation": 0.01, "upper": 0.05, "exact_dup": 0.03, "case_dup": 0.01,
    "near_dup": 0.03, "short": 0.02, "non_letter": 0.004, "repeats": 0.003, "eval_copy": 0.001,
}


def _base(n: int, rng: np.random.Generator) -> pa.Array:
    lengths = np.clip(rng.normal(10.5, 3.5, n).round().astype(np.int64), 3, 30)
    weights = 1.0 / np.arange(1, len(WORDS) + 1) ** 0.8
    weights /= weights.sum()
    words = pa.array(WORDS)
    idx = rng.choice(len(WORDS), size=int(lengths.sum()), p=weights)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), words.take(pa.array(idx)))
    return pc.binary_join(lists, " ")


def _pick(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    return np.flatnonzero(rng.random(n) < rate)


def _set(arr: pa.Array, idx: np.ndarray, new: pa.Array) -> pa.Array:
    if not len(idx):
        return arr
    mask = np.zeros(len(arr), dtype=bool)
    mask[idx] = True
    order = np.argsort(idx, kind="stable")  # replace_with_mask consumes replacements in row order
    return pc.replace_with_mask(arr, pa.array(mask), new.take(pa.array(order)))


def _choice(options: list[str], k: int, rng: np.random.Generator) -> pa.Array:
    return pa.array(options, pa.string()).take(pa.array(rng.integers(0, len(options), k)))


def noisy_captions(n: int, seed: int = 0, eval_captions: list[str] | None = None) -> pa.Array:
    """``n`` noisy CC3M-like captions (a string array, no nulls), the same for the same (n, seed, eval_captions)."""
    rng = np.random.default_rng(seed)
    arr = _base(n, rng)

    def sub(idx: np.ndarray) -> pa.Array:
        return arr.take(pa.array(idx, pa.int64()))

    def num(k: int) -> pa.Array:
        return pc.cast(pa.array(rng.integers(100, 10_000_000, k)), pa.string())

    j = pc.binary_join_element_wise
    i = _pick(n, RATES["upper"], rng)
    arr = _set(arr, i, pc.utf8_capitalize(sub(i)))
    i = _pick(n, RATES["accented"], rng)
    arr = _set(arr, i, j(sub(i), _choice(ACCENTED, len(i), rng), " "))
    i = _pick(n, RATES["mojibake"], rng)
    arr = _set(arr, i, j(_choice(MOJIBAKE, len(i), rng), sub(i), " "))
    i = _pick(n, RATES["html_entity"], rng)
    arr = _set(arr, i, j(sub(i), _choice(ENTITIES, len(i), rng), _choice(WORDS, len(i), rng), " "))
    i = _pick(n, RATES["html_tag"], rng)
    k = rng.integers(0, len(TAGS), len(i))
    arr = _set(arr, i, j(pa.array([TAGS[x][0] for x in k], pa.string()), sub(i), pa.array([TAGS[x][1] for x in k], pa.string()), ""))
    i = _pick(n, RATES["url"], rng)
    arr = _set(arr, i, j(sub(i), j(_choice(URLS, len(i), rng), num(len(i)), ""), " "))
    i = _pick(n, RATES["email"], rng)
    arr = _set(arr, i, j(sub(i), pa.array(["contact:"] * len(i), pa.string()), _choice(EMAILS, len(i), rng), " "))
    i = _pick(n, RATES["noise_chars"], rng)
    arr = _set(arr, i, j(_choice(NOISE_CHARS, len(i), rng), sub(i), _choice(NOISE_CHARS, len(i), rng), ""))
    i = _pick(n, RATES["punctuation"], rng)
    arr = _set(arr, i, j(sub(i), _choice(PUNCT, len(i), rng), ""))
    i = _pick(n, RATES["short"], rng)
    arr = _set(arr, i, _choice(SHORT, len(i), rng))
    i = _pick(n, RATES["non_letter"], rng)
    arr = _set(arr, i, _choice(NON_LETTER, len(i), rng))
    i = _pick(n, RATES["repeats"], rng)
    arr = _set(arr, i, _choice(REPEATS, len(i), rng))
    # duplicates of earlier captions (anywhere earlier, so also in earlier shards)
    i = _pick(n, RATES["exact_dup"], rng)
    i = i[i > 0]
    src = (rng.random(len(i)) * i).astype(np.int64)
    arr = _set(arr, i, sub(src))
    i = _pick(n, RATES["case_dup"], rng)
    i = i[i > 0]
    src = (rng.random(len(i)) * i).astype(np.int64)
    arr = _set(arr, i, j(pc.utf8_upper(sub(src)), pa.array(["."] * len(i), pa.string()), ""))
    i = _pick(n, RATES["near_dup"], rng)
    i = i[i > 0]
    src = (rng.random(len(i)) * i).astype(np.int64)
    arr = _set(arr, i, j(sub(src), _choice(WORDS, len(i), rng), " "))
    if eval_captions:
        i = _pick(n, RATES["eval_copy"], rng)
        arr = _set(arr, i, _choice(eval_captions, len(i), rng))
    return arr


def as_raw_shards(captions: pa.Array, rows_per_shard: int, per_row: int = 1, prefix: str = "s") -> list[pa.Table]:
    """Split captions into raw-shard tables (``sample_id``, ``captions`` with ``per_row`` captions a row)."""
    out = []
    n_rows = len(captions) // per_row
    for s in range(0, n_rows, rows_per_shard):
        e = min(s + rows_per_shard, n_rows)
        offs = pa.array(np.arange(0, (e - s) * per_row + 1, per_row, dtype=np.int32))
        caps = pa.ListArray.from_arrays(offs, captions.slice(s * per_row, (e - s) * per_row))
        ids = pc.binary_join_element_wise(pa.array([prefix] * (e - s)),
                                          pc.cast(pa.array(np.arange(s, e)), pa.string()), "")
        out.append(pa.table({"sample_id": ids, "captions": caps}))
    return out
