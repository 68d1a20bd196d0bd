"""``python -m mllm_pipeline.shard_range <dataset>``: the partition range of a dataset's shards, for
``dagster asset materialize --partition-range``.

Prints ``shard-00000...shard-NNNNN`` for the shards of the dataset's committed raw version (one partition of its
media and caption stages per raw shard), read from the storage root (``--storage-root``, else
``$MLLM_STORAGE_ROOT``, else ``./data``)::

    dagster asset materialize -m mllm_pipeline.definitions --select images_cc3m,captions_cc3m \\
        --partition-range "$(python -m mllm_pipeline.shard_range cc3m)"
"""

from __future__ import annotations

import argparse
import sys

from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.stages.media import shard_key
from mllm_pipeline.stages.registry import DATASET_NAMES
from mllm_pipeline.storage import Storage


def shard_range(storage: Storage, dataset: str, first: int = 0, last: int | None = None) -> str:
    """``shard-<first>...shard-<last>`` of ``dataset``'s committed raw version (default: all of its shards; a
    ``last`` beyond the last shard stops at it)."""
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}: one of {', '.join(DATASET_NAMES)}")
    try:
        n = len(raw_shards(storage, dataset))
    except FileNotFoundError:
        raise ValueError(f"raw_{dataset} has no committed version under {storage.root}: materialize raw_{dataset} "
                         "first") from None
    last = n - 1 if last is None else min(last, n - 1)
    if not 0 <= first <= last:
        raise ValueError(f"{dataset} has {n} shard(s) (shard-00000...{shard_key(n - 1)}); {first}..{last} is outside")
    return f"{shard_key(first)}...{shard_key(last)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", help=", ".join(DATASET_NAMES))
    ap.add_argument("--first", type=int, default=0, help="the first shard index (default 0)")
    ap.add_argument("--last", type=int, default=None, help="the last shard index (default, or when beyond it: the last shard)")
    ap.add_argument("--storage-root", default=None, help="default: $MLLM_STORAGE_ROOT, else ./data")
    args = ap.parse_args(argv)
    try:
        print(shard_range(Storage(args.storage_root), args.dataset, args.first, args.last))
    except ValueError as e:
        print(f"shard_range: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
