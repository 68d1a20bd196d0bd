"""Print what the pipeline has committed under the storage root: ``python -m mllm_pipeline.demo.summary``."""

from __future__ import annotations

import sys

from mllm_pipeline.storage import MANIFEST, Storage


def committed_outputs(storage: Storage) -> list[tuple[str, dict]]:
    """(prefix, manifest) for every committed output two levels below the root (e.g. ``raw/cc3m``)."""
    out = []
    for stage in storage.listdir(""):
        if stage == "media":
            continue
        for name in storage.listdir(stage):
            prefix = f"{stage}/{name}"
            if storage.exists(f"{prefix}/{MANIFEST}"):
                m = storage.read_manifest(prefix)
                if m.get("kind") == "raw_shards":
                    out.append((prefix, m))
    return out


def media_outputs(storage: Storage) -> list[tuple[str, dict]]:
    """(prefix, manifest) for every committed media shard (``media/<dataset>/<shard>``)."""
    out = []
    for dataset in storage.listdir("media"):
        for shard in storage.listdir(f"media/{dataset}"):
            prefix = f"media/{dataset}/{shard}"
            if storage.exists(f"{prefix}/{MANIFEST}"):
                out.append((prefix, storage.read_manifest(prefix)))
    return out


def main(argv: list[str] | None = None) -> int:
    storage = Storage(argv[0] if argv else None)
    outputs = committed_outputs(storage)
    if not outputs:
        print(f"Nothing committed under {storage.root} yet.")
        return 1
    print(f"\nCommitted outputs under {storage.root}:\n")
    print(f"  {'output':<22} {'rows in':>9} {'kept':>9} {'set aside':>10}  shards  location")
    for prefix, m in outputs:
        aside = sum(m.get("quarantined", {}).values())
        print(f"  {prefix:<22} {m.get('rows_in', 0):>9,} {m.get('rows_kept', 0):>9,} {aside:>10,}  {len(m.get('shards', [])):>6}  {m['location']}")
    print("\nSet-aside rows (with file, line and reason) are in each location's quarantine-*.parquet.")
    media = media_outputs(storage)
    if media:
        print(f"\n  {'media shard':<28} {'attempted':>9} {'succeeded':>9}  failed by reason")
        for prefix, m in media:
            s = m["summary"]
            reasons = ", ".join(f"{k} {v}" for k, v in s["failed_by_reason"].items()) or "-"
            print(f"  {prefix:<28} {s['attempted']:>9,} {s['succeeded']:>9,}  {reasons}")
        print("\nEach media shard is a webdataset media.tar plus samples.parquet (every row: success or its failure reason).")
    _curated(storage)
    return 0


def _curated(storage: Storage) -> None:
    """Clean captions, the watermark stage and the manifests, when they exist."""
    from mllm_pipeline.stages.captions import captions_prefix
    from mllm_pipeline.stages.registry import DATASET_NAMES
    from mllm_pipeline.stages.media import committed_shards

    rows = []
    for ds in DATASET_NAMES:
        for key in committed_shards(storage, ds, "captions"):
            c = storage.read_manifest(captions_prefix(ds, key))["counts"]
            dropped = ", ".join(f"{r} {c[r]}" for r in sorted(c) if r not in (
                "rows_in", "captions_in", "captions_kept", "captions_rejected", "captions_changed", "eval_captions") and c[r])
            rows.append(f"  {captions_prefix(ds, key):<28} {c['captions_in']:>9,} {c['captions_kept']:>9,} "
                        f"{c.get('eval_captions', 0):>9,}  {dropped or '-'}")
    if rows:
        # evaluation captions are kept whole (never filtered or de-duplicated): a count of their own, not a drop
        print(f"\n  {'clean captions':<28} {'captions':>9} {'kept':>9} {'eval':>9}  dropped by reason")
        print("\n".join(rows))
    wm = "curated/webvid_watermark"
    if storage.exists(wm):
        for key in sorted(k for k in storage.listdir(wm) if k.startswith("shard-")):
            if storage.exists(f"{wm}/{key}/_manifest.json"):
                m = storage.read_manifest(f"{wm}/{key}")
                s = m["summary"]
                print(f"\n  watermark {key}: mode {m['mode']}, {s['clips']} clips scored, {s['flagged']} watermarked, "
                      f"{s['kept']} kept, {s['dropped']} dropped")
    if storage.exists("manifests/_manifest.json"):
        m = storage.read_manifest("manifests")
        s = m["summary"]
        print(f"\n  manifests: {s['splits']} samples; seq_len {s['seq_len']}; "
              f"{s['dropped_too_long']} over max_seq_len dropped, {s['truncated']} truncated")
        print(f"  {m['location']}  (train.parquet, val.parquet, ...)")
        print("  samples by dataset and split: " + ", ".join(
            f"{k} {v}" for k, v in sorted(s.get("by_dataset", {}).items()) if k.rsplit(".", 1)[1] in ("train", "val", "test")))
    _exports(storage)
    if storage.exists("checkpoints/train_mllm/_manifest.json"):
        c = storage.read_manifest("checkpoints/train_mllm")
        trained = c.get("manifests_version")
        m = storage.committed_version("manifests", trained) if trained else None
        by = (m or {}).get("summary", {}).get("by_dataset", {})
        wds = sum(by.get(f"cc3m_wds.{split}", 0) for split in ("train", "val", "test"))
        print(f"\n  checkpoint: {c['location']}, trained on manifests {trained}"
              + (f" ({wds} pre-downloaded CC3M sample(s) among them)" if m else ""))


def _exports(storage: Storage) -> None:
    """The exports for each trainer: records per split and dataset, and the manifests version each came from."""
    from mllm_pipeline.exports import FORMATS
    from mllm_pipeline.stages.exports import export_prefix

    for fmt in FORMATS:
        prefix = export_prefix(fmt)
        if not storage.exists(f"{prefix}/_manifest.json"):
            continue
        e = storage.read_manifest(prefix)["summary"]
        by: dict[str, int] = {}
        for r in e["records"]:
            by[r["dataset"]] = by.get(r["dataset"], 0) + r["records"]
        skipped = sum(r["rows"] for r in e["skipped"])
        print(f"\n  export {fmt} ({e['consumer']}) from manifests {e['manifests_version']}: "
              + ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
              + (f"; {skipped} skipped ({', '.join(sorted({r['why'] for r in e['skipped']}))})" if skipped else ""))
        print(f"  {e['export_root']}  (media root {e['media_root']})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
