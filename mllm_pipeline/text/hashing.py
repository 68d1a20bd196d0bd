"""String hashing, shingles and MinHash, in numpy (vectorised) and in plain Python (reference), bit for bit equal.

Why hand-written: no well-kept library hashes the strings of an Arrow array without a Python call per string
(pyarrow exposes no string hash kernel; ``xxhash``/``mmh3`` are per-string calls), and datasketch's MinHash is a
per-document object. Everything here works on whole shards.

* **String hash** (64-bit): tabulation hashing over UTF-8 bytes. ``h(s) = mix(len(s)*K + sum_i T[i mod 4096, s_i]
  * (2*(i div 4096) + 1))`` mod 2**64, where ``T`` is a table of 4096 x 256 pseudo-random 64-bit words (SplitMix64
  of the index) and ``mix`` the SplitMix64 finaliser. In numpy that is one gather and one ``add.reduceat``.
* **Word shingles**: the duplicate key (see :func:`mllm_pipeline.text.rules.dedup_text`) split on spaces; a shingle
  is ``n`` consecutive words, hashed as ``mix(sum_k h(word_k) * M_k)``. A key with fewer than ``n`` words is one
  shingle of all its words. **Char shingles**: ``n`` consecutive UTF-8 bytes (= characters for ASCII text), hashed
  with the same table; a key shorter than ``n`` bytes is one shingle.
* **MinHash**: for permutation ``p`` with random odd ``a_p`` and random ``b_p`` (64-bit),
  ``sig_p = min over shingles of ((a_p * h + b_p) mod 2**64) >> 32`` -- the multiply-add-shift family
  (Dietzfelbinger 1996), which is 2-universal and needs no modulo, so numpy's wrapping ``uint64`` arithmetic and
  Python integers give the same values. Signatures are ``uint32``.
* **LSH band keys**: band ``j`` covers signature columns ``[j*r, (j+1)*r)`` and is keyed by
  ``mix(sum_t sig[j*r+t] * M_t + j)``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

MASK64 = (1 << 64) - 1
TABLE_POSITIONS = 4096
_GOLDEN = 0x9E3779B97F4A7C15
_LEN_K = 0xD6E8FEB86659FD93
#: Odd multipliers combining word hashes into n-gram hashes and signature values into band keys (index = position).
_MULTS_PY = [((0x9E3779B97F4A7C15 * (2 * k + 3)) | 1) & MASK64 for k in range(64)]


def splitmix64_py(x: int) -> int:
    """The SplitMix64 finaliser on one Python int (mod 2**64)."""
    x = (x + _GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(_GOLDEN)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


_TABLES: dict[int, np.ndarray] = {}
_TABLES_PY: dict[int, list[int]] = {}


def table(seed: int) -> np.ndarray:
    """The 4096 x 256 tabulation table for ``seed`` (flattened, uint64; 8 MiB, built once per process)."""
    t = _TABLES.get(seed)
    if t is None:
        idx = np.arange(TABLE_POSITIONS * 256, dtype=np.uint64)
        with np.errstate(over="ignore"):
            t = splitmix64_np(idx + np.uint64((seed * 0x632BE59BD9B4E019) & MASK64))
        _TABLES[seed] = t
    return t


def _table_py(seed: int) -> list[int]:
    t = _TABLES_PY.get(seed)
    if t is None:
        t = [int(v) for v in table(seed)]
        _TABLES_PY[seed] = t
    return t


def _mults(n: int) -> np.ndarray:
    return np.array(_MULTS_PY[:n], dtype=np.uint64)


# ---------------------------------------------------------------------------------------------------------------
# byte-level hashing of many strings at once
# ---------------------------------------------------------------------------------------------------------------


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64, data uint8) of a string array with no nulls, offsets rebased to start at 0."""
    arr = arr.cast(pa.large_string()) if pa.types.is_string(arr.type) else arr
    if arr.null_count:
        raise ValueError("hashing: the string array holds nulls")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]: offsets[-1]]
    return offsets - offsets[0], data


def _positions(offsets: np.ndarray) -> np.ndarray:
    lengths = np.diff(offsets)
    total = int(offsets[-1])
    return np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], lengths)


def _segment_sum(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Wrapping uint64 sum of ``values[offsets[i]:offsets[i+1]]`` for each i (0 for empty segments)."""
    n = len(offsets) - 1
    out = np.zeros(n, dtype=np.uint64)
    lengths = np.diff(offsets)
    nonempty = np.flatnonzero(lengths > 0)
    if len(nonempty):
        with np.errstate(over="ignore"):
            out[nonempty] = np.add.reduceat(values, offsets[:-1][nonempty])
    return out


def _byte_terms(data: np.ndarray, pos: np.ndarray, seed: int) -> np.ndarray:
    t = table(seed)
    slot = (pos % TABLE_POSITIONS) * 256 + data
    vals = t[slot]
    far = pos >= TABLE_POSITIONS
    if far.any():
        with np.errstate(over="ignore"):
            vals[far] *= (2 * (pos[far] // TABLE_POSITIONS) + 1).astype(np.uint64)
    return vals


def hash_strings(arr: pa.Array, seed: int) -> np.ndarray:
    """64-bit hash of every string of ``arr`` (no nulls), as uint64."""
    offsets, data = _buffers(arr)
    vals = _byte_terms(data, _positions(offsets), seed)
    sums = _segment_sum(vals, offsets)
    with np.errstate(over="ignore"):
        sums += np.diff(offsets).astype(np.uint64) * np.uint64(_LEN_K)
    return splitmix64_np(sums)


def split_spaces(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Words of strings whose words are separated by single spaces (as ``str.split(" ")``: "" is one empty word).

    Returns (data uint8, word starts, word lengths, words per string), without building Arrow lists.
    """
    offsets, data = _buffers(arr)
    sp = np.flatnonzero(data == 32)
    # merging two sorted arrays: a stable sort (timsort) does it in linear time
    starts = np.sort(np.concatenate([offsets[:-1], sp + 1]), kind="stable")
    ends = np.sort(np.concatenate([sp, offsets[1:]]), kind="stable")
    per_string = np.diff(np.searchsorted(sp, offsets)) + 1
    return data, starts, ends - starts, per_string


def hash_ranges(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seed: int) -> np.ndarray:
    """The hash of :func:`hash_strings` for the byte ranges ``data[starts[i]:starts[i]+lengths[i]]``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pos = _positions(offsets)
    src = np.repeat(starts, lengths) + pos
    vals = _byte_terms(data[src], pos, seed)
    sums = _segment_sum(vals, offsets)
    with np.errstate(over="ignore"):
        sums += lengths.astype(np.uint64) * np.uint64(_LEN_K)
    return splitmix64_np(sums)


def hash_string_py(s: str, seed: int) -> int:
    """The same hash as :func:`hash_strings`, for one string, in plain Python."""
    t = _table_py(seed)
    b = s.encode("utf-8")
    acc = 0
    for i, byte in enumerate(b):
        v = t[(i % TABLE_POSITIONS) * 256 + byte]
        if i >= TABLE_POSITIONS:
            v = v * (2 * (i // TABLE_POSITIONS) + 1)
        acc += v
    acc = (acc + len(b) * _LEN_K) & MASK64
    return splitmix64_py(acc)


# ---------------------------------------------------------------------------------------------------------------
# shingles
# ---------------------------------------------------------------------------------------------------------------


def word_shingles(keys: pa.Array, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word n-gram shingles of each key; returns (shingle hashes uint64, offsets int64 per key)."""
    data, ws, wl, counts = split_spaces(keys)  # >= 1 word for every key ("" is one empty word)
    wh = hash_ranges(data, ws, wl, seed)
    list_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=list_offsets[1:])
    n_sh = np.maximum(counts - n + 1, 1)
    sh_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(n_sh, out=sh_offsets[1:])
    total = int(sh_offsets[-1])
    owner = np.repeat(np.arange(len(counts)), n_sh)
    start = list_offsets[:-1][owner] + (np.arange(total) - sh_offsets[:-1][owner])  # first word of each shingle
    width = np.minimum(counts, n)[owner]
    acc = np.zeros(total, dtype=np.uint64)
    mults = _mults(n)
    with np.errstate(over="ignore"):
        for k in range(n):
            m = width > k
            acc[m] += wh[start[m] + k] * mults[k]
    return splitmix64_np(acc), sh_offsets


def word_shingles_py(key: str, n: int, seed: int) -> list[int]:
    words = key.split(" ")
    wh = [hash_string_py(w, seed) for w in words]
    width = min(len(words), n)
    out = []
    for s in range(max(len(words) - n + 1, 1)):
        acc = 0
        for k in range(width):
            acc += wh[s + k] * _MULTS_PY[k]
        out.append(splitmix64_py(acc & MASK64))
    return out


def char_shingles(keys: pa.Array, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the ``n``-byte shingles of each key; returns (shingle hashes uint64, offsets int64 per key)."""
    offsets, data = _buffers(keys)
    lengths = np.diff(offsets)
    n_sh = np.maximum(lengths - n + 1, 1)
    sh_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(n_sh, out=sh_offsets[1:])
    total = int(sh_offsets[-1])
    owner = np.repeat(np.arange(len(lengths)), n_sh)
    start = offsets[:-1][owner] + (np.arange(total) - sh_offsets[:-1][owner])
    width = np.minimum(lengths, n)[owner]
    acc = np.zeros(total, dtype=np.uint64)
    t = table(seed)
    with np.errstate(over="ignore"):
        for k in range(n):
            m = width > k
            acc[m] += t[k * 256 + data[start[m] + k].astype(np.int64)]
        acc += width.astype(np.uint64) * np.uint64(_LEN_K)
    return splitmix64_np(acc), sh_offsets


def char_shingles_py(key: str, n: int, seed: int) -> list[int]:
    t = _table_py(seed)
    b = key.encode("utf-8")
    width = min(len(b), n)
    out = []
    for s in range(max(len(b) - n + 1, 1)):
        acc = sum(t[k * 256 + b[s + k]] for k in range(width)) + width * _LEN_K
        out.append(splitmix64_py(acc & MASK64))
    return out


# ---------------------------------------------------------------------------------------------------------------
# MinHash and LSH
# ---------------------------------------------------------------------------------------------------------------


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) parameters of the ``num_perm`` hash functions: ``a`` odd, both uint64."""
    base = np.arange(2 * num_perm, dtype=np.uint64) + np.uint64((seed * 0x2545F4914F6CDD1D + 12345) & MASK64)
    r = splitmix64_np(base)
    return r[:num_perm] | np.uint64(1), r[num_perm:]


def minhash(shingles: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int, chunk: int = 1 << 21) -> np.ndarray:
    """MinHash signatures (n_keys x num_perm, uint32) from shingle hashes grouped by ``offsets``.

    Keys are grouped by shingle count; within a group every key's shingle list is padded to the group's width by
    repeating its own shingles (which leaves the minimum unchanged), so the minimum is a plain ``min`` over one axis
    of an (keys, width, num_perm) block instead of a slow ``minimum.reduceat``.
    """
    a, b = permutations(num_perm, seed)
    n = len(offsets) - 1
    out = np.empty((n, num_perm), dtype=np.uint32)
    counts = np.diff(offsets)
    if n == 0:
        return out
    # width classes: 1..8 exactly, then multiples of 4 up to 64, then powers of two
    width = np.where(counts <= 8, counts, np.where(counts <= 64, (counts + 3) // 4 * 4,
                                                   2 ** np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)))
    shift = np.uint64(32)
    for w in np.unique(width).tolist():
        keys = np.flatnonzero(width == w)
        per = max(1, chunk // (w * num_perm))
        for s0 in range(0, len(keys), per):
            k = keys[s0: s0 + per]
            t = np.arange(w)
            idx = offsets[k][:, None] + (t[None, :] % counts[k][:, None])
            h = shingles[idx]  # (keys, w)
            with np.errstate(over="ignore"):
                vals = h[:, :, None] * a[None, None, :]
                vals += b
            out[k] = (vals.min(axis=1) >> shift).astype(np.uint32)
    return out


def minhash_py(shingles: list[int], num_perm: int, seed: int) -> list[int]:
    a, b = permutations(num_perm, seed)
    out = []
    for ap, bp in zip(a.tolist(), b.tolist()):
        out.append(min(((ap * h + bp) & MASK64) >> 32 for h in shingles))
    return out


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """LSH band keys (n x bands, uint64) of uint32 signatures."""
    mults = _mults(rows)
    out = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(bands):
            block = sigs[:, j * rows:(j + 1) * rows].astype(np.uint64)
            acc = (block * mults[None, :]).sum(axis=1, dtype=np.uint64) + np.uint64(j)
            out[:, j] = splitmix64_np(acc)
    return out


def band_keys_py(sig: list[int], bands: int, rows: int) -> list[int]:
    out = []
    for j in range(bands):
        acc = sum(sig[j * rows + t] * _MULTS_PY[t] for t in range(rows)) + j
        out.append(splitmix64_py(acc & MASK64))
    return out
