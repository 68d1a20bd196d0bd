"""Run the pipeline on the embedded demo with the Dagster CLI, stage by stage: ``python -m mllm_pipeline.demo.run``.

1. ``dagster job execute -j demo_pipeline``: the unpartitioned stages (raw annotations for all datasets). The raw
   assets register one partition per raw shard.
2. ``dagster asset materialize --select <assets> --partition-range shard-00000...shard-NNNNN`` for each dataset:
   its per-shard stages (media download, clean captions, and for WebVid the watermark stage) over all its shards,
   in one run.
3. ``dagster asset materialize --select captions_dedup,manifests,train_mllm``: the cross-shard stages, ending in
   a tiny model trained on the demo's manifests.

Every command is printed before it runs, so the same commands can be reused on real data. Extra arguments go to
``dagster job execute`` (e.g. ``-c config.yaml``).
"""

from __future__ import annotations

import shlex
import subprocess
import sys

MODULE = "mllm_pipeline.definitions"

#: (assets, partitions definition) in the order they run: each dataset's per-shard stages, in one run per dataset
PARTITIONED_STAGES = [
    ("images_cc3m,captions_cc3m", "cc3m_shards"),
    ("images_coco,captions_coco", "coco_shards"),
    ("videos_webvid,captions_webvid,webvid_watermark", "webvid_shards"),
    ("videos_msrvtt,captions_msrvtt", "msrvtt_shards"),
    ("videos_internvid,captions_internvid", "internvid_shards"),
]
#: the cross-shard stages, after every shard is done
FINAL_STAGES = "captions_dedup,manifests,train_mllm"


def _run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    import dagster as dg

    argv = list(sys.argv[1:] if argv is None else argv)
    _run(["dagster", "job", "execute", "-m", MODULE, "-j", "demo_pipeline", *argv])
    with dg.DagsterInstance.get() as instance:
        ranges = {name: instance.get_dynamic_partitions(name) for _, name in PARTITIONED_STAGES}
    for asset, name in PARTITIONED_STAGES:
        keys = ranges[name]
        if not keys:
            print(f"\n{asset}: no {name} partitions yet (its raw asset has no shards); skipped")
            continue
        _run(["dagster", "asset", "materialize", "-m", MODULE, "--select", asset, "--partition-range", f"{keys[0]}...{keys[-1]}"])
    _run(["dagster", "asset", "materialize", "-m", MODULE, "--select", FINAL_STAGES])
    from mllm_pipeline.demo.summary import main as summary

    return summary([])


if __name__ == "__main__":
    sys.exit(main())
