"""InternVid's grouping sorts out of core: spilled runs merged give exactly the stable in-memory order."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from mllm_pipeline.sources.internvid import SORT_KEYS, ExternalSort


@pytest.mark.parametrize("run_rows", [10**9, 7_000, 1_000])
def test_external_sort_equals_the_in_memory_sort(run_rows, tmp_path):
    rng = random.Random(run_rows)
    n = 30_000
    table = pa.table({
        "group_id": [f"v{rng.randrange(2_000):05d}" for _ in range(n)],
        "clip_start_s": [float(rng.randrange(40)) for _ in range(n)],  # many ties: the arrival order decides
        "clip_end_s": [float(rng.randrange(40, 45)) for _ in range(n)],
        "captions": [[f"caption {i}"] for i in range(n)],
    })
    sorter = ExternalSort(run_rows=run_rows, merge_rows=4_000, work_dir=str(tmp_path))
    for i in range(0, n, 3_333):
        sorter.add(table.slice(i, 3_333))
    batches = list(sorter.sorted())
    want = table.append_column("_seq", pa.array(range(n), pa.int64())).sort_by([(k, "ascending") for k in SORT_KEYS])
    assert pa.concat_tables(batches).equals(want)
    if run_rows < n:
        assert len(batches) > 1 and max(b.num_rows for b in batches) < n  # merged a batch at a time
    assert list(tmp_path.iterdir()) == []  # the spilled runs are gone
