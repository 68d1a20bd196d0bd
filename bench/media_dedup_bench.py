"""Media-level de-duplication: hashing speed and the duplicate search at CC3M size.

1. **Hashing** (per core): :func:`image_phash` (JPEG draft decode at reduced size, then imagehash's DCT hash)
   against the plain way (full decode, ``imagehash.phash``), on the same JPEGs in the same process; both give
   the same hash on these images (checked).
2. **Search**: :func:`find_media_duplicates` (bit-sampling LSH, verified pairs) against an exhaustive vectorised
   Hamming search on the same hashes (numpy popcount over all pairs, in blocks) at a size the exhaustive search
   can do; reports the ratio and the LSH's recall of the true pairs within ``max_distance``.
3. **Full size**: the search on 3.3M hashes (a CC3M-size shard set, with planted exact and near copies), time and
   peak memory (RSS).

    python bench/media_dedup_bench.py [--images 400] [--exhaustive 40000] [--full 3300000]
"""

from __future__ import annotations

import argparse
import io
import resource
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from mllm_pipeline.vision.media_dedup import MediaDedupConfig, find_media_duplicates
from mllm_pipeline.vision.media_hash import image_phash


def _jpeg(seed: int, size=(640, 480)) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bench_hashing(n: int) -> None:
    import imagehash

    data = [_jpeg(i) for i in range(n)]
    t0 = time.perf_counter()
    ours = [image_phash(d) for d in data]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = []
    for d in data:
        with Image.open(io.BytesIO(d)) as im:
            bits = imagehash.phash(im).hash.reshape(-1)
        plain.append(int(np.packbits(bits.astype(np.uint8)).view(">u8")[0]))
    t_plain = time.perf_counter() - t0
    diff = np.array([bin(a ^ b).count("1") for a, b in zip(ours, plain)])
    print(f"hashing {n} 640x480 JPEGs: {n / t_ours:,.0f} images/s/core (draft decode) vs {n / t_plain:,.0f} "
          f"(full decode): {t_plain / t_ours:.2f}x; hash bits that differ: mean {diff.mean():.2f}, max {diff.max()}")


def planted(n: int, seed: int = 0, dup_share: float = 0.02) -> tuple[pa.Table, int]:
    """``n`` random 64-bit hashes; ``dup_share`` of them replaced by near copies (1-3 bits flipped) of others."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, size=n).astype(np.uint64)
    k = int(n * dup_share)
    copies = h[rng.integers(0, n - k, size=k)]
    flips = rng.integers(1, 4, size=k)
    for t in range(3):
        bit = rng.integers(0, 64, size=k).astype(np.uint64)
        copies = np.where(flips > t, copies ^ (np.uint64(1) << bit), copies)
    h[n - k:] = copies
    offsets = pa.array(np.arange(n + 1, dtype=np.int32))
    table = pa.table({
        "dataset": pa.array(["cc3m"] * n), "sample_id": pa.array([f"s{i}" for i in range(n)]),
        "media_kind": pa.array(["image"] * n), "is_eval": pa.array(np.zeros(n, dtype=bool)),
        "content": pa.nulls(n, pa.binary(16)),
        "phash": pa.ListArray.from_arrays(offsets, pa.array(h, pa.uint64())),
    })
    return table, k


def exhaustive_pairs(h: np.ndarray, max_distance: int, block: int = 2048) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for s in range(0, len(h), block):
        a = h[s: s + block]
        d = np.bitwise_count(a[:, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= max_distance)
        for i, j in zip((ii + s).tolist(), jj.tolist()):
            if i < j:
                out.add((i, j))
    return out


def bench_search(n: int) -> None:
    table, planted_k = planted(n)
    cfg = MediaDedupConfig()
    t0 = time.perf_counter()
    dec = find_media_duplicates(table, cfg)
    t_lsh = time.perf_counter() - t0
    h = np.array([v[0] for v in table["phash"].to_pylist()], dtype=np.uint64)
    t0 = time.perf_counter()
    truth = exhaustive_pairs(h, cfg.max_distance)
    t_ex = time.perf_counter() - t0
    # every sample with an earlier true match must be dropped (earliest-kept rule): recall of the duplicates
    should = {j for _, j in truth}
    dropped = {int(s[1:]) for s in dec.drops["sample_id"].to_pylist()}
    recall = len(should & dropped) / max(1, len(should))
    print(f"search over {n:,} hashes: LSH {t_lsh:.2f}s vs exhaustive vectorised {t_ex:.2f}s: {t_ex / t_lsh:.1f}x; "
          f"{len(should):,} samples with a match within {cfg.max_distance} bits ({planted_k:,} planted), "
          f"recall {recall:.4f}, false drops {len(dropped - should)}")


def bench_full(n: int) -> None:
    table, k = planted(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    dec = find_media_duplicates(table, MediaDedupConfig())
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"full size: {n:,} hashes ({k:,} planted near copies): {dt:.1f}s, {dec.counts['media_duplicate']:,} "
          f"media duplicates; peak RSS {peak:,.0f} MiB ({peak - base:,.0f} MiB above the input table)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--exhaustive", type=int, default=40_000)
    ap.add_argument("--full", type=int, default=3_300_000)
    a = ap.parse_args()
    bench_hashing(a.images)
    bench_search(a.exhaustive)
    if a.full:
        bench_full(a.full)


if __name__ == "__main__":
    main()
