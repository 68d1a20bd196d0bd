"""Run the pipeline on the embedded demo with the Dagster CLI, stage by stage: ``python -m mllm_pipeline.demo.run``.

1. ``dagster job execute -j demo_pipeline``: the unpartitioned stages (raw annotations for all datasets). The raw
   assets register one partition per raw shard.
2. ``dagster asset materialize --select <asset> --partition-range shard-00000...shard-NNNNN`` for each partitioned
   stage (media downloads), over all its shards, in one run each.

Every command is printed before it runs, so the same commands can be reused on real data. Extra arguments go to
``dagster job execute`` (e.g. ``-c config.yaml``).
"""

from __future__ import annotations

import shlex
import subprocess
import sys

MODULE = "mllm_pipeline.definitions"

#: (asset, partitions definition) in the order they run
PARTITIONED_STAGES = [
    ("images_cc3m", "cc3m_shards"),
    ("images_coco", "coco_shards"),
    ("videos_webvid", "webvid_shards"),
    ("videos_msrvtt", "msrvtt_shards"),
    ("videos_internvid", "internvid_shards"),
]


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
    from mllm_pipeline.demo.summary import main as summary

    return summary([])


if __name__ == "__main__":
    sys.exit(main())
