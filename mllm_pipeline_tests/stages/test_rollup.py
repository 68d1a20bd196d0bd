"""Shard roll-ups read from storage: one version for every shard, which changes exactly when a shard's does."""

from __future__ import annotations

from mllm_pipeline.sources.cc3m import ingest_cc3m
from mllm_pipeline.stages import rollup
from mllm_pipeline.storage import Storage


def _commit(storage: Storage, prefix: str, content: str) -> str:
    with storage.new_version(prefix, {"content": content}) as v:
        storage.write_bytes(v.rel("x.txt"), content.encode())
        return v.commit({"content": content})["version"]


def test_rollup_follows_every_shard_and_names_the_changed_one(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    assert rollup.shard_versions(storage, "cc3m", lambda k: f"out/{k}") == {}  # no raw stage yet
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("".join(f"caption number {i}\thttp://example.org/{i}.jpg\n" for i in range(6)))
    ingest_cc3m([str(tsv)], storage, rows_per_shard=2)

    before = rollup.shard_versions(storage, "cc3m", lambda k: f"out/{k}")
    assert before == {"shard-00000": None, "shard-00001": None, "shard-00002": None}
    assert rollup.summary(before) == {"shards": 3, "committed": 0, "not_committed": 3}

    first = {k: _commit(storage, f"out/{k}", "a") for k in before}
    now = rollup.shard_versions(storage, "cc3m", lambda k: f"out/{k}")
    assert now == first and rollup.changed_shards(before, now) == sorted(before)
    assert rollup.rollup_version(now) == rollup.rollup_version(dict(reversed(list(now.items()))))  # order-free

    _commit(storage, "out/shard-00001", "b")
    after = rollup.shard_versions(storage, "cc3m", lambda k: f"out/{k}")
    assert rollup.changed_shards(now, after) == ["shard-00001"]
    assert rollup.rollup_version(after) != rollup.rollup_version(now)
    # a raw shard added but not yet processed changes nothing downstream; once it commits, it is a change
    added = {**after, "shard-00003": None}
    assert rollup.changed_shards(after, added) == [] and rollup.rollup_version(added) == rollup.rollup_version(after)
    assert rollup.changed_shards(added, {**added, "shard-00003": "v-1"}) == ["shard-00003"]
    assert rollup.changed_shards(after, {k: v for k, v in after.items() if k != "shard-00002"}) == ["shard-00002"]
