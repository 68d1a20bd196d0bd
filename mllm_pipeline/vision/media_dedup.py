"""Media-level duplicates: which samples show the same image or clip, and which one of each group is kept.

Input: every stored sample of every dataset, in priority order (dataset order, then shard, then row), with its
content digest and perceptual hashes (:mod:`mllm_pipeline.vision.media_hash`) and whether it belongs to an
evaluation split. Images are compared with images, videos with videos.

1. **Exact**: samples with the same content digest are the same file.
2. **Near**: perceptual hashes within ``max_distance`` bits (the largest distance over a video's frames).
   Candidates come from bit-sampling LSH (``tables`` tables of ``bits`` randomly chosen hash bits each, a fixed
   seed); every candidate pair is verified on the full hashes. With the defaults (24 tables of 24 bits) a pair at
   distance 4 is found with probability 0.997, at distance 2 with 0.99999; two unrelated hashes share a table's
   key with probability 2^-24, so at 3.3M hashes a table proposes ~0.3M candidate pairs.
3. **Decisions**, deterministic for a given input order:
   * an evaluation sample is never dropped and never changed;
   * a training sample that matches an evaluation sample is ``eval_leak`` (the evaluation sample is named);
   * among training samples, each one that matches an earlier *kept* sample is ``media_duplicate`` of it, and its
     captions move to that sample; a sample is matched only against kept samples, so chains (A~B~C with A and C
     far apart) never join unrelated media.

Hand-written because no maintained library indexes 64-bit perceptual hashes for Hamming-radius search at this
scale without a service (faiss' binary indexes would be the alternative; it is a large dependency for one
numpy-sized job: 3.3M hashes are 26 MB).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DECISION_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # eval_leak | media_duplicate
    pa.field("match", pa.string(), nullable=False),  # exact | near
    pa.field("distance", pa.int32()),  # perceptual-hash bits that differ (0 for exact copies)
    pa.field("kept_dataset", pa.string(), nullable=False),  # the sample it duplicates (kept, or the eval sample)
    pa.field("kept_sample_id", pa.string(), nullable=False),
])


@dataclasses.dataclass(frozen=True)
class MediaDedupConfig:
    """``enabled``: look for media duplicates at all; ``near``: also near copies (else exact bytes only);
    ``max_distance``: largest perceptual-hash distance (bits of 64) of a near copy; ``tables``/``bits``/``seed``:
    the LSH that proposes candidates; ``max_bucket``: a bucket member is compared with at most this many earlier
    members of its bucket (keeps a flood of identical placeholder images linear)."""

    enabled: bool = True
    near: bool = True
    max_distance: int = 4
    tables: int = 24
    bits: int = 24
    seed: int = 7
    max_bucket: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance <= 16:
            raise ValueError(f"max_distance must be between 0 and 16 bits, not {self.max_distance}")
        if not 1 <= self.tables <= 64 or not 4 <= self.bits <= 40:
            raise ValueError(f"tables must be 1..64 and bits 4..40, not {self.tables} and {self.bits}")
        if self.max_bucket < 1:
            raise ValueError(f"max_bucket must be at least 1, not {self.max_bucket}")


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    b = x.view(np.uint8).reshape(*x.shape, 8)
    return np.unpackbits(b, axis=-1).sum(axis=(-1,)).reshape(x.shape).astype(np.int64)


def distances(h: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Largest Hamming distance over the hash columns of rows ``i`` and ``j`` of ``h`` (n x frames uint64)."""
    return _popcount(h[i] ^ h[j]).max(axis=1) if len(i) else np.zeros(0, np.int64)


def _bucket_pairs(keys: np.ndarray, max_bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) index pairs of items sharing a key; each item is paired with at most ``max_bucket``
    earlier members of its bucket."""
    n = len(keys)
    order = np.lexsort((np.arange(n), keys))
    k = keys[order]
    new = np.ones(n, dtype=bool)
    new[1:] = k[1:] != k[:-1]
    start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    before = np.minimum(np.arange(n) - start, max_bucket)
    has = np.flatnonzero(before > 0)
    if not len(has):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cnt = before[has]
    right = np.repeat(has, cnt)
    pos0 = np.repeat(np.cumsum(cnt) - cnt, cnt)
    left = np.repeat(has, cnt) - 1 - (np.arange(len(right)) - pos0)  # the nearest earlier members first
    # and always the bucket's first member, so a flood of copies still finds the sample that was kept
    right = np.concatenate([right, has])
    left = np.concatenate([left, start[has]])
    return order[left], order[right]


def candidate_pairs(h0: np.ndarray, config: MediaDedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (i < j) candidate pairs from bit-sampling LSH on one 64-bit hash per item."""
    rng = np.random.default_rng(config.seed)
    pi, pj = [], []
    for _ in range(config.tables):
        bits = np.sort(rng.choice(64, size=config.bits, replace=False)).astype(np.uint64)
        key = np.zeros(len(h0), dtype=np.uint64)
        for t, b in enumerate(bits):
            key |= ((h0 >> b) & np.uint64(1)) << np.uint64(t)
        a, b_ = _bucket_pairs(key, config.max_bucket)
        lo, hi = np.minimum(a, b_), np.maximum(a, b_)
        pi.append(lo)
        pj.append(hi)
    if not pi:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n = max(len(h0), 1)
    combo = np.unique(np.concatenate(pi).astype(np.int64) * n + np.concatenate(pj).astype(np.int64))
    return combo // n, combo % n


@dataclasses.dataclass
class MediaDecisions:
    """``drops``: one row per dropped sample (``DECISION_SCHEMA``); ``counts``: per reason and match kind."""

    drops: pa.Table
    counts: dict[str, int]


def find_media_duplicates(items: pa.Table, config: MediaDedupConfig = MediaDedupConfig()) -> MediaDecisions:
    """Decide media duplicates among ``items`` (in priority order): columns ``dataset``, ``sample_id``,
    ``media_kind``, ``is_eval`` (bool), ``content`` (binary digest, may be null) and ``phash`` (list<uint64>, may
    be null). See the module doc for the rules."""
    out: list[dict[str, Any]] = []
    counts = {"samples": items.num_rows, "eval_leak": 0, "media_duplicate": 0, "exact": 0, "near": 0}
    if not config.enabled or items.num_rows == 0:
        return MediaDecisions(pa.Table.from_pylist([], schema=DECISION_SCHEMA), counts)
    kinds = pc.fill_null(items["media_kind"].cast(pa.string()), "image")
    for kind in sorted(set(kinds.to_pylist())):
        sub = items.filter(pc.equal(kinds, kind))
        out += _decide(sub, config)
    for r in out:
        counts[r["reason"]] += 1
        counts[r["match"]] += 1
    return MediaDecisions(pa.Table.from_pylist(out, schema=DECISION_SCHEMA), counts)


def _decide(sub: pa.Table, config: MediaDedupConfig) -> list[dict[str, Any]]:
    from mllm_pipeline.vision.media_hash import phash_matrix

    n = sub.num_rows
    ds = sub["dataset"].cast(pa.string()).to_pylist()
    sid = sub["sample_id"].cast(pa.string()).to_pylist()
    is_eval = pc.fill_null(sub["is_eval"], False).to_numpy(zero_copy_only=False).astype(bool)
    frames = int(pc.max(pc.fill_null(pc.list_value_length(sub["phash"]), 0)).as_py() or 0) or 1
    h, has = phash_matrix(sub["phash"], frames)
    status = np.zeros(n, dtype=np.int8)  # 0 kept, 1 dropped
    decided: dict[int, dict[str, Any]] = {}

    # 1. exact copies: the group's first member represents it; training copies of an evaluation file leak
    rep = np.arange(n)
    content = sub["content"]
    valid = pc.is_valid(content).to_numpy(zero_copy_only=False).astype(bool)
    if valid.any():
        idx = np.flatnonzero(valid)
        codes = pc.dictionary_encode(content.filter(pa.array(valid))).combine_chunks().indices.to_numpy(zero_copy_only=False)
        first = np.full(int(codes.max()) + 1, n, dtype=np.int64)
        np.minimum.at(first, codes, idx)
        first_eval = np.full(len(first), n, dtype=np.int64)
        if is_eval[idx].any():
            np.minimum.at(first_eval, codes[is_eval[idx]], idx[is_eval[idx]])
        rep[idx] = first[codes]
        for i, c in zip(idx.tolist(), codes.tolist()):
            if not is_eval[i] and first_eval[c] < n:
                status[i] = 1
                decided[i] = _row(ds, sid, i, int(first_eval[c]), "eval_leak", True, 0)
    follower = (rep != np.arange(n)) & ~is_eval & (status == 0)

    # 2. near copies among the representatives (and every evaluation sample)
    live = np.flatnonzero(has & ~follower & ((status == 0) | is_eval))
    if config.near and len(live) > 1:
        a, b = candidate_pairs(h[live, 0], config)
        pi, pj = live[a], live[b]
        dist = distances(h, pi, pj)
        ok = dist <= config.max_distance
        pi, pj, dist = pi[ok], pj[ok], dist[ok]
        # evaluation leaks: a training sample near any evaluation sample (the nearest, then earliest, is named)
        ev_pair = is_eval[pi] ^ is_eval[pj]
        leak_of: dict[int, tuple[int, int]] = {}
        for i, j, d in zip(pi[ev_pair].tolist(), pj[ev_pair].tolist(), dist[ev_pair].tolist()):
            tr, ev = (j, i) if is_eval[i] else (i, j)
            if status[tr]:
                continue
            best = leak_of.get(tr)
            if best is None or (d, ev) < (best[1], best[0]):
                leak_of[tr] = (ev, d)
        for tr, (ev, d) in leak_of.items():
            status[tr] = 1
            decided[tr] = _row(ds, sid, tr, ev, "eval_leak", False, d)
        # training duplicates: in order, each sample joins the earliest kept sample it is near
        tt = ~(is_eval[pi] | is_eval[pj])
        pi, pj, dist = pi[tt], pj[tt], dist[tt]
        order = np.lexsort((pi, pj))
        for i, j, d in zip(pi[order].tolist(), pj[order].tolist(), dist[order].tolist()):
            if status[j] or status[i]:
                continue
            status[j] = 1
            decided[j] = _row(ds, sid, j, i, "media_duplicate", False, d)

    # 3. exact copies follow their representative
    for i in np.flatnonzero(follower).tolist():
        r = int(rep[i])
        if status[r] == 0:
            decided[i] = _row(ds, sid, i, r, "media_duplicate", True, 0)
        else:
            via = decided[r]
            decided[i] = {**via, "dataset": ds[i], "sample_id": sid[i]}
        status[i] = 1
    return [decided[i] for i in sorted(decided)]


def _row(ds: list[str], sid: list[str], i: int, kept: int, reason: str, exact: bool, d: int) -> dict[str, Any]:
    return {"dataset": ds[i], "sample_id": sid[i], "reason": reason, "match": "exact" if exact else "near",
            "distance": int(d), "kept_dataset": ds[kept], "kept_sample_id": sid[kept]}


def describe(row: dict[str, Any]) -> str:
    """A readable detail for one decision row."""
    what = "the same bytes as" if row["match"] == "exact" else f"a near copy (hash distance {row['distance']}) of"
    who = "evaluation sample" if row["reason"] == "eval_leak" else "kept sample"
    return f"{what} {who} {row['kept_dataset']}:{row['kept_sample_id']}"
