"""Benchmark: vectorised caption cleaning against the per-caption Python reference of the same rules.

    .venv/bin/python bench/captions_bench.py                       # 3,300,000 captions; reference on 100,000
    .venv/bin/python bench/captions_bench.py --rows 200000 --ref-rows 20000    # a quick run

What it does (see bench/README.md for the figures):

1. Generates, reproducibly (``--seed``), ``--eval-rows`` evaluation captions (a COCO-val-size set) and ``--rows``
   noisy CC3M-like training captions with :func:`mllm_pipeline_tests.text.synthetic.noisy_captions`: HTML entities and
   tags, URLs, e-mail addresses, mojibake, control characters, repeated punctuation, exact and near duplicates
   (also across shards), too-short, non-letter and repetitive captions, and copies of evaluation captions. The
   captions are cut into raw shards of ``--shard-rows`` rows (one caption a row, as CC3M). Not timed.
2. **Prefix, both engines** (the first ``--ref-rows`` captions): the vectorised path (``clean_shard`` on every
   shard, then ``dedup_across`` with the evaluation captions) and the per-caption reference
   (``clean_shard_reference`` + ``dedup_across_reference``), in this process, one after the other. Asserts that
   kept tables (including MinHash signatures), rejected tables, counts, examples and cross-shard drops are
   identical, then prints both times and the ratio reference / vectorised.
3. **Full size, vectorised only**: every shard through ``clean_shard`` and, streamed, ``dedup_across``; prints the
   time, the captions per second, the reasons, the index size and the peak RSS of the process.

The per-caption reference is far too slow for 3.3M captions (about 0.9 ms a caption), which is why the ratio is
measured on the prefix. Times are wall-clock around the work only (generation excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from mllm_pipeline.text import REASONS, CleanConfig, clean_shard, dedup_across  # noqa: E402
from mllm_pipeline_tests.text.reference import clean_shard_reference, dedup_across_reference  # noqa: E402
from mllm_pipeline_tests.text.synthetic import as_raw_shards, noisy_captions  # noqa: E402

TARGET_RATIO = 10.0


def run_vectorised(shards: list[pa.Table], eval_caps: dict, config: CleanConfig, keep: bool, dataset: str = "cc3m"):
    """clean_shard on every shard, dedup_across streamed over them; returns (seconds, totals, results, cross)."""
    totals = {k: 0 for k in ("captions_in", "captions_kept", *REASONS)}
    results = []

    def cleaned():
        for i, t in enumerate(shards):
            r = clean_shard(t, dataset, config)
            for k in totals:
                totals[k] += r.counts.get(k, 0)
            if keep:
                results.append(r)
            yield f"{i:05d}", r

    t0 = time.perf_counter()
    cross = dedup_across(cleaned(), eval_caps, config)
    secs = time.perf_counter() - t0
    for k in ("eval_leak", "exact_duplicate", "near_duplicate"):
        totals[k] += cross.counts[k]
    totals["captions_kept"] = cross.counts["captions_kept"]
    return secs, totals, results, cross


def run_reference(shards: list[pa.Table], eval_caps: dict, config: CleanConfig):
    t0 = time.perf_counter()
    results = [clean_shard_reference(t, "cc3m", config) for t in shards]
    drops = dedup_across_reference([(f"{i:05d}", r) for i, r in enumerate(results)], eval_caps, config)
    return time.perf_counter() - t0, results, drops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3_300_000, help="training captions in the full-size run")
    ap.add_argument("--ref-rows", type=int, default=100_000, help="prefix run through both engines (0: skip)")
    ap.add_argument("--baseline-rows", type=int, default=300_000,
                    help="prefix run through the strong baseline (pandas + rensa) and the pipeline (0: skip)")
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--eval-rows", type=int, default=25_000, help="evaluation captions (COCO val has ~25k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", default="cc3m", help="whose rules the full-size run applies (webvid: its boilerplate rules)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.rows <= 0 or not 0 <= args.ref_rows <= args.rows or args.shard_rows <= 0 or args.baseline_rows > args.rows:
        ap.error("need 0 <= --ref-rows <= --rows, --baseline-rows <= --rows and --shard-rows > 0")
    config = CleanConfig()

    t0 = time.perf_counter()
    eval_list = noisy_captions(args.eval_rows, seed=args.seed + 1_000_003).to_pylist()
    caps = noisy_captions(args.rows, seed=args.seed, eval_captions=eval_list)
    shards = as_raw_shards(caps, args.shard_rows)
    eval_caps = {"coco_val": eval_list}
    print(f"generated {args.rows:,} captions ({len(shards)} shards of {args.shard_rows:,}) and {args.eval_rows:,} "
          f"evaluation captions in {time.perf_counter() - t0:.1f} s (not timed below)")
    print(f"python {platform.python_version()}, pyarrow {pa.__version__}, {platform.machine()}")

    # warm-up outside the timings: imports, ftfy's tables, the hash tables
    clean_shard(as_raw_shards(noisy_captions(2000, seed=99), 2000)[0], "cc3m", config)
    clean_shard_reference(as_raw_shards(noisy_captions(200, seed=99), 200)[0], "cc3m", config)

    # 0. prefix: the strong baseline (vectorised pandas strings + rensa MinHash LSH) against the pipeline
    b_ratio = None
    if args.baseline_rows:
        from caption_baseline import EvalIndex, clean_captions

        prefix = as_raw_shards(caps.slice(0, args.baseline_rows), args.shard_rows)
        t0 = time.perf_counter()
        index = EvalIndex(eval_list)
        b_tot: dict[str, int] = {}
        for t in prefix:
            for k, v in clean_captions(pc.list_flatten(t["captions"]).combine_chunks(), index).items():
                b_tot[k] = b_tot.get(k, 0) + v
        b_secs = time.perf_counter() - t0
        o_secs, o_tot, _, _ = run_vectorised(prefix, eval_caps, config, keep=False)
        b_ratio = b_secs / o_secs
        nb = args.baseline_rows
        print(f"\nprefix of {nb:,} captions: strong baseline (pandas string ops + rensa MinHash LSH) {b_secs:.2f} s "
              f"({nb / b_secs:,.0f} captions/s), kept {b_tot['kept']:,}, eval_leak {b_tot['eval_leak']:,}")
        print(f"  mllm_pipeline {o_secs:.2f} s ({nb / o_secs:,.0f} captions/s), kept {o_tot['captions_kept']:,}, "
              f"eval_leak {o_tot['eval_leak']:,}")
        print(f"  ratio baseline / mllm_pipeline: {b_ratio:.2f}x")

    # 1. prefix: both engines, identical output
    prefix = as_raw_shards(caps.slice(0, max(args.ref_rows, 1)), args.shard_rows)
    v_secs, v_tot, v_res, v_cross = run_vectorised(prefix, eval_caps, config, keep=True)
    r_secs, r_res, r_drops = run_reference(prefix, eval_caps, config) if args.ref_rows else (None, [], [])
    for i, (a, b) in enumerate(zip(v_res, r_res)):
        assert a.kept.equals(b.kept), f"shard {i}: kept tables differ"
        assert a.rejected.equals(b.rejected), f"shard {i}: rejected tables differ"
        assert a.counts == b.counts and a.examples == b.examples, f"shard {i}: counts or examples differ"
    for i, (a, b) in enumerate(zip(v_cross.drops, r_drops)):
        assert a.equals(b), f"shard {i}: cross-shard drops differ"
    ratio = r_secs / v_secs if r_secs else None
    n_ref = args.ref_rows
    if ratio is None:
        print("\n(per-caption reference skipped)")
    else:
        print(f"\nprefix of {n_ref:,} captions ({len(prefix)} shards): outputs identical "
              f"(kept incl. signatures, rejected, counts, examples, cross-shard drops)")
        print(f"{'engine':<12}{'seconds':>10}{'captions/s':>14}")
        print(f"{'reference':<12}{r_secs:>10.2f}{n_ref / r_secs:>14,.0f}")
        print(f"{'vectorised':<12}{v_secs:>10.2f}{n_ref / v_secs:>14,.0f}")
        print(f"ratio reference / vectorised: {ratio:.1f}x  (target >= {TARGET_RATIO:.0f}x: "
              f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    del v_res, r_res, v_cross, r_drops

    # 2. full size, vectorised only
    f_secs, f_tot, _, f_cross = run_vectorised(shards, eval_caps, config, keep=False, dataset=args.dataset)
    n = f_tot["captions_in"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nfull size, vectorised: {n:,} captions in {f_secs:.1f} s ({n / f_secs:,.0f} captions/s), "
          f"kept {f_tot['captions_kept']:,}")
    print("  dropped: " + ", ".join(f"{k} {f_tot[k]:,}" for k in REASONS if f_tot[k]))
    assert f_tot["captions_kept"] + sum(f_tot[k] for k in REASONS) == n, "accounting broken"
    print(f"  dedup index: {f_cross.index.nbytes() / 2**20:,.0f} MiB for {f_cross.index.train.n:,} training and "
          f"{f_cross.index.eval.n:,} evaluation captions; peak RSS of this process {rss:,.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({
            "rows": args.rows, "ref_rows": n_ref, "shard_rows": args.shard_rows, "eval_rows": args.eval_rows,
            "prefix_reference_s": r_secs, "prefix_vectorised_s": v_secs, "ratio": ratio, "baseline_ratio": b_ratio,
            "full_vectorised_s": f_secs, "full_counts": f_tot, "index_bytes": f_cross.index.nbytes(),
            "peak_rss_mib": rss}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
