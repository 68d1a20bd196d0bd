"""Duplicate detection: within a shard (in :func:`clean_shard`) and across shards and against evaluation splits.

Two stages, each deterministic:

1. **Within a shard** (:func:`within_shard`), on the captions that passed every filter, in shard order (row, then
   position in the row's ``captions`` list): a caption whose duplicate key equals an earlier one's is an
   ``exact_duplicate`` of the first; among the rest, a caption is a ``near_duplicate`` if an earlier one shares an
   LSH band with it and their MinHash Jaccard estimate reaches the threshold (the earliest such caption is named).
   "Earlier" counts every exact-unique caption, also one that is itself a near duplicate, so the outcome never
   depends on the order pairs are examined in.
2. **Across shards** (:func:`dedup_across` / :class:`DedupIndex`), on the captions stage 1 kept, shard by shard in
   shard order: ``eval_leak`` first (exact key or near match with any evaluation caption), then ``exact_duplicate``
   and ``near_duplicate`` against every caption stage 1 kept in an earlier shard. The index holds all of those,
   whatever stage 2 decided about them, so the result depends only on the shard order, never on the order in which
   shards were materialised. A caption stage 1 already dropped keeps its stage-1 reason.

Memory of a :class:`DedupIndex`: per caption ``4 * num_perm`` bytes of signature, 16 bytes per LSH band and 16
bytes for the exact hash (sorted key + ordinal), plus the sample id string and caption index (~20 bytes for CC3M):
about 430 bytes with the defaults (64 permutations, 9 bands), and the signature buffer grows by doubling (up to
2x slack). Measured: 1.7 GiB for 3.2M CC3M-like training captions and 25k evaluation captions
(``bench/captions_bench.py``). The caption texts are never held.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_pipeline.text import hashing as H
from mllm_pipeline.text.config import REJECTED_SCHEMA, CleanConfig, kept_schema

PAIR_CHUNK = 1 << 21  # candidate pairs verified at a time


# ---------------------------------------------------------------------------------------------------------------
# signatures
# ---------------------------------------------------------------------------------------------------------------


def signatures(keys: pa.Array, config: CleanConfig) -> np.ndarray:
    """MinHash signatures (n x num_perm uint32) of duplicate keys."""
    n = config.effective_shingle_size
    if config.shingle == "word":
        sh, offs = H.word_shingles(keys, n, config.seed)
    else:
        sh, offs = H.char_shingles(keys, n, config.seed)
    return H.minhash(sh, offs, config.num_perm, config.seed)


def _equal_counts(sig_a: np.ndarray, ia: np.ndarray, sig_b: np.ndarray, ib: np.ndarray) -> np.ndarray:
    out = np.empty(len(ia), dtype=np.int64)
    step = max(1, PAIR_CHUNK // max(sig_a.shape[1], 1))
    for s in range(0, len(ia), step):
        out[s: s + step] = (sig_a[ia[s: s + step]] == sig_b[ib[s: s + step]]).sum(axis=1)
    return out


def _passes(eq: np.ndarray, config: CleanConfig) -> np.ndarray:
    return eq / config.num_perm >= config.near_dup_threshold


@dataclasses.dataclass
class WithinShard:
    """Stage-1 duplicate decisions for the filtered captions of one shard (positions 0..m-1 in shard order)."""

    exact_of: np.ndarray  # index of the earlier caption with the same key, or -1
    near_of: np.ndarray  # index of the earliest earlier near duplicate, or -1 (only for exact-unique captions)
    near_eq: np.ndarray  # equal signature entries with that caption
    uniq: np.ndarray  # positions of the exact-unique captions
    sigs: np.ndarray  # their signatures (len(uniq) x num_perm)


def within_shard(keys: pa.Array, config: CleanConfig, scope: np.ndarray | None = None) -> WithinShard:
    """Stage 1 on the duplicate keys of the filtered captions of one shard (in shard order).

    ``scope``: one integer per caption (the ordinal of its medium); captions are compared only with captions of the
    same scope, so two images that share a caption both keep it. None: every caption of the shard is compared."""
    m = len(keys)
    exact_of = np.full(m, -1, dtype=np.int64)
    near_of = np.full(m, -1, dtype=np.int64)
    near_eq = np.zeros(m, dtype=np.int64)
    scope_mix = None
    if scope is not None:
        scope = np.asarray(scope, dtype=np.int64)
        if len(scope) != m:
            raise ValueError(f"within_shard: {len(scope)} scope values for {m} captions")
        scope_mix = H.splitmix64_np(scope.astype(np.uint64))
    if m and config.exact_dedup:
        ids = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False).astype(np.int64)
        if scope is not None:  # (scope, key) pairs: the same key in two media is two keys
            _, ids = np.unique(scope * (int(ids.max()) + 1) + ids, return_inverse=True)
            ids = ids.reshape(-1).astype(np.int64)
        uids, first = np.unique(ids, return_index=True)
        first_of_id = np.empty(int(ids.max()) + 1, dtype=np.int64)
        first_of_id[uids] = first
        f = first_of_id[ids]
        dup = f != np.arange(m)
        exact_of[dup] = f[dup]
    uniq = np.flatnonzero(exact_of < 0)
    sigs = signatures(keys.take(pa.array(uniq)), config) if len(uniq) else np.empty((0, config.num_perm), np.uint32)
    result = WithinShard(exact_of, near_of, near_eq, uniq, sigs)
    if not config.near_dedup or len(uniq) < 2:
        return result
    bk = H.band_keys(sigs, config.lsh_bands, config.lsh_rows)
    if scope_mix is not None:  # a band key only collides within one medium
        bk = bk ^ scope_mix[uniq][:, None]
    pairs_i, pairs_j = [], []
    local = np.arange(len(uniq), dtype=np.int64)
    for band in range(config.lsh_bands):
        order = np.lexsort((local, bk[:, band]))
        k = bk[order, band]
        new_group = np.ones(len(k), dtype=bool)
        new_group[1:] = k[1:] != k[:-1]
        gstart = np.maximum.accumulate(np.where(new_group, np.arange(len(k)), 0))
        before = np.arange(len(k)) - gstart  # earlier members of the same bucket
        has = np.flatnonzero(before > 0)
        if not len(has):
            continue
        cnt = before[has]
        right = np.repeat(has, cnt)
        pos0 = np.repeat(np.cumsum(cnt) - cnt, cnt)
        left = np.repeat(gstart[has], cnt) + (np.arange(len(right)) - pos0)
        pairs_i.append(order[left])
        pairs_j.append(order[right])
    if not pairs_i:
        return result
    u = len(uniq)
    combo = np.unique(np.concatenate(pairs_i) * u + np.concatenate(pairs_j))
    pi, pj = combo // u, combo % u
    eq = _equal_counts(sigs, pi, sigs, pj)
    ok = _passes(eq, config)
    pi, pj, eq = pi[ok], pj[ok], eq[ok]
    if len(pi):
        order = np.lexsort((pi, pj))  # earliest i for each j
        pi, pj, eq = pi[order], pj[order], eq[order]
        first = np.ones(len(pj), dtype=bool)
        first[1:] = pj[1:] != pj[:-1]
        near_of[uniq[pj[first]]] = uniq[pi[first]]
        near_eq[uniq[pj[first]]] = eq[first]
    return result


# ---------------------------------------------------------------------------------------------------------------
# sorted multimap (an LSM of sorted runs) and the growable signature store
# ---------------------------------------------------------------------------------------------------------------


class _Runs:
    """uint64 key -> int64 ordinal multimap made of sorted runs; adding is amortised O(log n) per entry."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Add entries; ``vals`` must be increasing and larger than every value added before."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")  # ties keep their (increasing) value order
        self.runs.append((keys[order], vals[order]))
        while len(self.runs) >= 2 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k2, v2), (k1, v1) = self.runs[-2], self.runs[-1]
            k = np.concatenate([k2, k1])
            # two sorted runs, the second's values all larger: a stable sort merges them in linear time
            order = np.argsort(k, kind="stable")
            self.runs[-2:] = [(k[order], np.concatenate([v2, v1])[order])]

    @staticmethod
    def _ranges(k: np.ndarray, q: np.ndarray, qo: np.ndarray, qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """searchsorted with sorted needles ``qs = q[qo]`` (cache-friendly), results in q's order."""
        lo = np.empty(len(q), dtype=np.int64)
        hi = np.empty(len(q), dtype=np.int64)
        lo[qo] = np.searchsorted(k, qs, side="left")
        hi[qo] = np.searchsorted(k, qs, side="right")
        return lo, hi

    def lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All matches: (index into q, ordinal) pairs."""
        qi, vals = [], []
        qo = np.argsort(q)
        qs = q[qo]
        for k, v in self.runs:
            lo, hi = self._ranges(k, q, qo, qs)
            cnt = hi - lo
            has = np.flatnonzero(cnt)
            if not len(has):
                continue
            c = cnt[has]
            rep = np.repeat(has, c)
            pos0 = np.repeat(np.cumsum(c) - c, c)
            qi.append(rep)
            vals.append(v[np.repeat(lo[has], c) + (np.arange(len(rep)) - pos0)])
        if not qi:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(qi), np.concatenate(vals)

    def first(self, q: np.ndarray) -> np.ndarray:
        """The smallest ordinal stored under each key of q (-1 if none)."""
        best = np.full(len(q), np.iinfo(np.int64).max, dtype=np.int64)
        qo = np.argsort(q)
        qs = q[qo]
        for k, v in self.runs:
            lo, hi = self._ranges(k, q, qo, qs)
            hit = hi > lo
            best[hit] = np.minimum(best[hit], v[lo[hit]])
        best[best == np.iinfo(np.int64).max] = -1
        return best

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.runs)


class _Store:
    """Signatures, exact hashes, band maps and references of the captions of one kind (training or eval)."""

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self.sigs = np.empty((0, config.num_perm), dtype=np.uint32)
        self.n = 0
        self.exact = _Runs()
        self.bands = [_Runs() for _ in range(config.lsh_bands)]
        self.labels: list[str] = []
        # per added batch (one shard or one eval split): ids, caption indexes, hashes; concatenated when needed
        self._parts: list[tuple[pa.Array, np.ndarray, np.ndarray]] = []
        self._starts: list[int] = []
        self._cache: tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _columns(self) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
        """(sample_id, caption_index, dedup_hash, label number) of every ordinal."""
        if self._cache is None:
            if self._parts:
                sid = pa.concat_arrays([p[0] for p in self._parts])
                ci = np.concatenate([p[1] for p in self._parts])
                hs = np.concatenate([p[2] for p in self._parts])
                lab = np.concatenate([np.full(len(p[2]), i, dtype=np.int32) for i, p in enumerate(self._parts)])
            else:
                sid, ci, hs, lab = pa.array([], pa.string()), np.zeros(0, np.int32), np.zeros(0, np.uint64), np.zeros(0, np.int32)
            self._cache = (sid, ci, hs, lab)
        return self._cache

    def add(self, sample_id: pa.Array, caption_index: np.ndarray, hashes: np.ndarray, sigs: np.ndarray, label: str) -> None:
        k = len(hashes)
        if k == 0:
            return
        if self.n + k > len(self.sigs):
            cap = max(self.n + k, 2 * len(self.sigs), 1024)
            grown = np.empty((cap, self.config.num_perm), dtype=np.uint32)
            grown[: self.n] = self.sigs[: self.n]
            self.sigs = grown
        self.sigs[self.n: self.n + k] = sigs
        ords = np.arange(self.n, self.n + k, dtype=np.int64)
        hashes = hashes.astype(np.uint64)
        self.exact.add(hashes, ords)
        bk = H.band_keys(sigs, self.config.lsh_bands, self.config.lsh_rows)
        for b, runs in enumerate(self.bands):
            runs.add(bk[:, b], ords)
        self._starts.append(self.n)
        self._parts.append((sample_id.cast(pa.string()), np.asarray(caption_index, dtype=np.int32), hashes))
        self._cache = None
        self.labels.append(label)
        self.n += k

    def ref(self, ordinal: int) -> tuple[str, int, str]:
        """(sample_id, caption_index, label) of an ordinal."""
        part = bisect.bisect_right(self._starts, ordinal) - 1
        sid, ci, _ = self._parts[part]
        at = ordinal - self._starts[part]
        return sid[at].as_py(), int(ci[at]), self.labels[part]

    def match(self, hashes: np.ndarray, sigs: np.ndarray, exact: bool, near: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each query: (earliest exact-match ordinal or -1, earliest near-match ordinal or -1, its equal count).
        Near matches are searched only for queries without an exact match."""
        q = len(hashes)
        ex = np.full(q, -1, dtype=np.int64)
        nr = np.full(q, -1, dtype=np.int64)
        neq = np.zeros(q, dtype=np.int64)
        if self.n == 0 or q == 0:
            return ex, nr, neq
        if exact:
            ex = self.exact.first(hashes.astype(np.uint64))
        if not near:
            return ex, nr, neq
        todo = np.flatnonzero(ex < 0)
        if not len(todo):
            return ex, nr, neq
        bk = H.band_keys(sigs[todo], self.config.lsh_bands, self.config.lsh_rows)
        qs, os_ = [], []
        for b, runs in enumerate(self.bands):
            qi, o = runs.lookup(bk[:, b])
            qs.append(qi)
            os_.append(o)
        qi = np.concatenate(qs)
        o = np.concatenate(os_)
        if not len(qi):
            return ex, nr, neq
        combo = np.unique(qi * (self.n + 1) + o)
        qi, o = combo // (self.n + 1), combo % (self.n + 1)  # sorted by (query, ordinal)
        eq = _equal_counts(sigs[todo], qi, self.sigs, o)
        ok = _passes(eq, self.config)
        qi, o, eq = qi[ok], o[ok], eq[ok]
        if len(qi):
            first = np.ones(len(qi), dtype=bool)
            first[1:] = qi[1:] != qi[:-1]
            nr[todo[qi[first]]] = o[first]
            neq[todo[qi[first]]] = eq[first]
        return ex, nr, neq

    def nbytes(self) -> int:
        return (len(self.sigs) * self.config.num_perm * 4 + self.exact.nbytes() + sum(r.nbytes() for r in self.bands)
                + sum(p[0].nbytes + p[1].nbytes + p[2].nbytes for p in self._parts))

    def to_table(self, kind: str) -> pa.Table:
        sid, ci, hs, lab = self._columns()
        flat = pa.array(self.sigs[: self.n].reshape(-1), type=pa.uint32())
        return pa.table(
            {
                "kind": pa.array([kind] * self.n, pa.string()),
                "label": pa.array([self.labels[i] for i in lab.tolist()], pa.string()),
                "sample_id": sid,
                "caption_index": pa.array(ci, pa.int32()),
                "dedup_hash": pa.array(hs, pa.uint64()),
                "minhash": pa.FixedSizeListArray.from_arrays(flat, self.config.num_perm),
            }
        )


# ---------------------------------------------------------------------------------------------------------------
# the cross-shard index
# ---------------------------------------------------------------------------------------------------------------


def _detail_ref(sid: str, ci: int) -> str:
    return f"{sid}[{ci}]"


@dataclasses.dataclass
class ShardDrops:
    """Stage-2 decisions for one shard: a rejected table (same schema as ``ShardCleanResult.rejected``)."""

    label: str
    rejected: pa.Table
    counts: dict[str, int]


class DedupIndex:
    """Exact hashes and MinHash signatures of evaluation captions and of the training captions seen so far.

    Add evaluation captions first (:meth:`add_eval`), then call :meth:`check_and_add` once per shard, in shard
    order. :meth:`save` / :meth:`load` keep the index between runs (Parquet; the settings that make signatures
    comparable are stored with it and checked on load).
    """

    def __init__(self, config: CleanConfig | None = None, cross_train: bool | None = None) -> None:
        self.config = config or CleanConfig()
        #: also compare training captions with the training captions of earlier shards (``dedup_scope="dataset"``);
        #: otherwise only with the evaluation captions, and training captions are not held
        self.cross_train = self.config.dedup_scope == "dataset" if cross_train is None else cross_train
        self.eval = _Store(self.config)
        self.train = _Store(self.config)
        self.shards_seen: list[str] = []

    # -- building ------------------------------------------------------------------------------------------------

    def add_eval(self, captions: pa.Table | Sequence[str], name: str, dataset: str | None = None) -> int:
        """Add the captions of an evaluation split (e.g. MSR-VTT test, COCO val) under ``name``.

        ``captions`` is a raw-shard table (``sample_id`` + ``captions`` list, as in ``BASE_SCHEMA``; a string
        ``caption`` column also works) or a plain list of strings (ids are then the positions). Captions are
        normalised with the same rules as training captions (plus ``dataset``'s own rules, if given); empty ones
        are skipped. Returns the number added.
        """
        from mllm_pipeline.text.clean import explode_captions
        from mllm_pipeline.text.normalize import dedup_keys, normalize

        if self.train.n:
            raise ValueError("DedupIndex.add_eval: add evaluation captions before any training shard")
        if isinstance(captions, pa.Table):
            sid, ci, raw = explode_captions(captions, f"evaluation split {name!r}")
        else:
            if isinstance(captions, str):
                raise ValueError(f"DedupIndex.add_eval({name!r}): captions must be a table or a list of strings, not a str")
            raw = pa.array(list(captions), pa.string())
            sid = pa.array([str(i) for i in range(len(raw))], pa.string())
            ci = np.zeros(len(raw), dtype=np.int32)
        clean = normalize(raw, dataset, self.config.dataset_rules)
        nonempty = np.flatnonzero(pc.binary_length(clean).to_numpy(zero_copy_only=False) > 0)
        idx = pa.array(nonempty)
        keys = dedup_keys(clean.take(idx))
        self.eval.add(sid.take(idx), np.asarray(ci)[nonempty], H.hash_strings(keys, self.config.seed),
                      signatures(keys, self.config), name)
        return len(nonempty)

    def check_and_add(self, kept: pa.Table, label: str | None = None) -> ShardDrops:
        """Stage 2 for one shard's kept table (``ShardCleanResult.kept``), then add its captions to the index."""
        label = str(len(self.shards_seen)) if label is None else str(label)
        expect = kept_schema(self.config.num_perm)
        missing = [f.name for f in expect if f.name not in kept.column_names]
        if missing:
            raise ValueError(f"DedupIndex.check_and_add: shard {label!r} lacks column(s) {missing} of a kept table")
        if kept.schema.field("minhash").type != expect.field("minhash").type:
            raise ValueError(
                f"DedupIndex.check_and_add: shard {label!r} has minhash {kept.schema.field('minhash').type}, "
                f"this index expects {expect.field('minhash').type} (num_perm={self.config.num_perm})"
            )
        n = kept.num_rows
        hashes = kept.column("dedup_hash").to_numpy().astype(np.uint64)
        sigs = _sig_matrix(kept.column("minhash"), self.config.num_perm)
        reason: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        # eval leaks first: always exact and near
        ex, nr, neq = self.eval.match(hashes, sigs, exact=True, near=True)
        for i in np.flatnonzero((ex >= 0) | (nr >= 0)).tolist():
            if ex[i] >= 0:
                sid, ci, lab = self.eval.ref(int(ex[i]))
                detail[i] = f"exact copy of eval caption {lab}:{_detail_ref(sid, ci)}"
            else:
                sid, ci, lab = self.eval.ref(int(nr[i]))
                detail[i] = f"near copy of eval caption {lab}:{_detail_ref(sid, ci)} (jaccard {neq[i] / self.config.num_perm:.2f})"
            reason[i] = "eval_leak"
        free = np.array([r is None for r in reason], dtype=bool)
        idx = np.flatnonzero(free)
        ex, nr, neq = self.train.match(hashes[idx], sigs[idx], exact=self.config.exact_dedup and self.cross_train,
                                       near=self.config.near_dedup and self.cross_train)
        for k in np.flatnonzero(ex >= 0).tolist():
            sid, ci, lab = self.train.ref(int(ex[k]))
            reason[idx[k]] = "exact_duplicate"
            detail[idx[k]] = f"same as {_detail_ref(sid, ci)} in shard {lab}"
        for k in np.flatnonzero(nr >= 0).tolist():
            sid, ci, lab = self.train.ref(int(nr[k]))
            reason[idx[k]] = "near_duplicate"
            detail[idx[k]] = f"near {_detail_ref(sid, ci)} in shard {lab} (jaccard {neq[k] / self.config.num_perm:.2f})"
        if self.cross_train:
            self.train.add(kept.column("sample_id").combine_chunks(), kept.column("caption_index").to_numpy(), hashes, sigs, label)
        self.shards_seen.append(label)
        drop = np.flatnonzero(~np.array([r is None for r in reason], dtype=bool))
        take = pa.array(drop, pa.int64())
        rejected = pa.table(
            {
                "sample_id": kept.column("sample_id").take(take),
                "caption_index": kept.column("caption_index").take(take),
                "caption_raw": kept.column("caption_raw").take(take),
                "caption_clean": kept.column("caption").take(take),
                "reason": pa.array([reason[i] for i in drop.tolist()], pa.string()),
                "detail": pa.array([detail[i] for i in drop.tolist()], pa.string()),
            },
            schema=REJECTED_SCHEMA,
        )
        counts = {r: 0 for r in ("eval_leak", "exact_duplicate", "near_duplicate")}
        for i in drop.tolist():
            counts[reason[i]] += 1
        counts.update(captions_in=n, captions_kept=n - len(drop))
        if counts["captions_kept"] + len(drop) != n:  # accounting, always checked
            raise AssertionError(f"dedup accounting broken for shard {label}: {counts}")
        return ShardDrops(label, rejected, counts)

    # -- persistence ---------------------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held by the index (numpy arrays and Arrow id strings)."""
        return self.eval.nbytes() + self.train.nbytes()

    def save(self, where: str | BinaryIO | None = None) -> bytes | None:
        """Write the index as Parquet to a path or binary file object; with no argument, return the bytes."""
        table = pa.concat_tables([self.eval.to_table("eval"), self.train.to_table("train")])
        meta = {f"dedup.{k}": v for k, v in self.config.dedup_fingerprint().items()}
        meta["dedup.shards"] = "\x1f".join(self.shards_seen)
        table = table.replace_schema_metadata(meta)
        if where is None:
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            return buf.getvalue()
        pq.write_table(table, where, compression="zstd")
        return None

    @classmethod
    def load(cls, source: str | bytes | BinaryIO, config: CleanConfig | None = None) -> "DedupIndex":
        """Read an index written by :meth:`save`. Its settings must match ``config`` (ValueError names the first
        that differs)."""
        config = config or CleanConfig()
        table = pq.read_table(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        for k, v in config.dedup_fingerprint().items():
            saved = meta.get(f"dedup.{k}")
            if saved != v:
                raise ValueError(f"DedupIndex.load: the saved index has {k}={saved}, the config has {k}={v}")
        index = cls(config)
        shards = meta.get("dedup.shards", "")
        for kind, store in (("eval", index.eval), ("train", index.train)):
            part = table.filter(pc.equal(table.column("kind"), kind))
            labels = part.column("label").to_pylist()
            # add label by label, in stored order (ordinals are preserved)
            start = 0
            while start < part.num_rows:
                end = start
                while end < part.num_rows and labels[end] == labels[start]:
                    end += 1
                sl = part.slice(start, end - start)
                store.add(sl.column("sample_id").combine_chunks(), sl.column("caption_index").to_numpy(),
                          sl.column("dedup_hash").to_numpy().astype(np.uint64),
                          _sig_matrix(sl.column("minhash"), config.num_perm), labels[start])
                start = end
        index.shards_seen = shards.split("\x1f") if shards else []
        return index


def _sig_matrix(col: pa.ChunkedArray | pa.Array, num_perm: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.empty((0, num_perm), dtype=np.uint32)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.uint32, copy=False).reshape(len(arr), num_perm)


@dataclasses.dataclass
class CrossShardResult:
    """What :func:`dedup_across` decided: one :class:`ShardDrops` per shard (in shard order), totals, the index."""

    shards: list[ShardDrops]
    counts: dict[str, int]
    index: DedupIndex

    @property
    def drops(self) -> list[pa.Table]:
        return [s.rejected for s in self.shards]


def dedup_across(
    shards: Iterable[Any],
    eval_captions: Mapping[str, pa.Table | Sequence[str]] | DedupIndex | None = None,
    config: CleanConfig | None = None,
) -> CrossShardResult:
    """Stage 2 over all shards of a dataset, in shard order; the result depends only on that order.

    ``shards``: an iterable (a generator is fine: each kept table is dropped once checked, only signatures stay)
    of ``ShardCleanResult``, kept tables, or ``(label, result_or_table)`` pairs. ``eval_captions``: a mapping
    ``name -> table or list of strings`` of evaluation splits, or a :class:`DedupIndex` that already holds them
    (and possibly earlier shards). Returns the per-shard drop lists.
    """
    config = config or (eval_captions.config if isinstance(eval_captions, DedupIndex) else CleanConfig())
    if isinstance(eval_captions, DedupIndex):
        index = eval_captions
        if index.config.dedup_fingerprint() != config.dedup_fingerprint():
            raise ValueError("dedup_across: the DedupIndex was built with other dedup settings than config")
    else:
        index = DedupIndex(config)
        for name, caps in (eval_captions or {}).items():
            index.add_eval(caps, name)
    out: list[ShardDrops] = []
    totals: dict[str, int] = {"eval_leak": 0, "exact_duplicate": 0, "near_duplicate": 0, "captions_in": 0, "captions_kept": 0}
    for pos, item in enumerate(shards):
        label = None
        if isinstance(item, tuple) and len(item) == 2:
            label, item = item
        kept = getattr(item, "kept", item)
        if not isinstance(kept, pa.Table):
            raise ValueError(f"dedup_across: shard #{pos} is {type(item).__name__}, expected a ShardCleanResult or kept table")
        drops = index.check_and_add(kept, label if label is not None else str(len(index.shards_seen)))
        out.append(drops)
        for k, v in drops.counts.items():
            totals[k] += v
    return CrossShardResult(out, totals, index)
