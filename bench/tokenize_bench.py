"""Benchmark: the manifests' tokenization against a bare batched fast-tokenizer call on the same captions.

    .venv/bin/python bench/tokenize_bench.py                 # 300,000 captions, best of 3
    .venv/bin/python bench/tokenize_bench.py --rows 50000    # a quick run

* The captions are CC3M-like (the ingest benchmark's hypernymised vocabulary, 6-16 words), generated with a seed.
* The tokenizer is a byte-level BPE with a 32,000-token vocabulary (the size of a Llama-family vocabulary),
  trained on the spot on those captions: nothing is downloaded.
* ``baseline``: ``tokenizer(captions, add_special_tokens=False)`` — one batched call, the least any pipeline does.
* ``ours``: :func:`mllm_pipeline.manifests.tokenize_samples` over the same captions: the instruct template's
  prompt (picked per sample id), the caption, end-of-sequence, the answer-only label mask, the sequence length
  with the media tokens, over-length handling, and the Arrow columns the manifest writes.

Both run in this process, alternately, ``--repeats`` times; the best time of each is compared. Target: ours
reaches at least 0.8x the baseline's throughput.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest_bench import CC3M_WORDS  # noqa: E402

from mllm_pipeline.manifests import TokenizeConfig, load_tokenizer, tokenize_samples  # noqa: E402
from mllm_pipeline.demo.tokenizer import train_tokenizer  # noqa: E402

TARGET = 0.8


def captions(n: int, seed: int = 5) -> list[str]:
    words = list(CC3M_WORDS)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 17, size=n)
    idx = rng.integers(0, len(words), size=int(lengths.sum()))
    out, pos = [], 0
    for ln in lengths.tolist():
        out.append(" ".join(words[i] for i in idx[pos:pos + ln]))
        pos += ln
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32_000)
    args = ap.parse_args()

    texts = captions(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok = load_tokenizer(str(train_tokenizer(texts[:200_000], Path(tmp) / "tok", vocab_size=args.vocab)))
        print(f"trained a {len(tok):,}-token BPE in {time.perf_counter() - t0:.1f}s; {args.rows:,} captions")
    ids = [f"cc3m-{i}" for i in range(args.rows)]
    kinds = ["image"] * args.rows
    media = np.full(args.rows, 1561, dtype=np.int64)
    cfg = TokenizeConfig()

    best = {"baseline": float("inf"), "ours": float("inf")}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        base = tok(texts, add_special_tokens=False)["input_ids"]
        best["baseline"] = min(best["baseline"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = tokenize_samples(tok, ids, kinds, texts, media, cfg)
        best["ours"] = min(best["ours"], time.perf_counter() - t0)
        print(f"round {r + 1}: baseline {best['baseline']:.2f}s, ours {best['ours']:.2f}s (best so far)")
    caption_tokens = sum(len(b) for b in base)
    assert ours.num_rows == args.rows and int(ours["text_tokens"].to_numpy().sum()) > caption_tokens
    ratio = best["baseline"] / best["ours"]
    print()
    print(f"{'contender':<10} {'seconds':>8} {'captions/s':>12}")
    for name in ("baseline", "ours"):
        print(f"{name:<10} {best[name]:>8.2f} {args.rows / best[name]:>12,.0f}")
    print(f"\nthroughput ratio ours/baseline: {ratio:.2f} (target >= {TARGET}) -> {'MET' if ratio >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
