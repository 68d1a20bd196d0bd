"""Staleness and automation at a real shard count: 160 CC3M shards (past Dagster's 100-partition limit on staleness
edges) fetched from a loopback HTTP server, through captions, media hashes, de-duplication and manifests; then one
shard changes (a retry through img2dataset fetches its one missing image) and the stages that read every shard must
show stale, name the shard, and be the only thing the automation requests.

Every fetch is the real asset with the real img2dataset: the first is one run over the 160 shards (what a
single-run backfill of the range launches), which img2dataset fetches in one run of its own, each shard committed
as its rows are done. Only the last step, a shard "committed by a script outside Dagster", fetches with a plain
HTTP GET per image from the same server.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request

import dagster as dg
from dagster._core.definitions.data_version import (SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD,
                                                    CachingStaleStatusResolver, StaleStatus)
from dagster._core.loader import LoadingContextForTest
from PIL import Image

from mllm_pipeline.definitions import defs
from mllm_pipeline.defs.media.assets import MEDIA_ROLLUPS
from mllm_pipeline.download.fetched import Fetched
from mllm_pipeline.download.images import ImageOptions
from mllm_pipeline.sources.common import raw_shards
from mllm_pipeline.stages.media import materialize_shard
from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.download.conftest import make_jpeg
from mllm_pipeline_tests.media_server import serve_directory

SHARDS = 160
ROWS_PER_SHARD = 2
CHANGED = 42  # the shard whose second image answers 404 at first
WHOLE = ["media_hashes", "captions_dedup", "manifests"]

WORDS = ["dog", "cat", "car", "tree", "boat", "house", "river", "bird", "horse", "bridge", "flower", "train"]
COLORS = ["red", "blue", "green", "old", "small", "large", "white", "black"]


def _caption(i: int) -> str:
    return f"a {COLORS[i % 8]} {WORDS[(i // 8) % 12]} near the {WORDS[(i // 96 + 5) % 12]} number {i}"


def _http_fetcher(rows, log):
    """One GET per image from the loopback server (what img2dataset would ask for), decoded sizes from the bytes."""
    for r in rows:
        try:
            with urllib.request.urlopen(r["url"], timeout=5) as resp:
                data = resp.read()
        except urllib.error.HTTPError as e:
            yield Fetched(r["row"], False, f"http_{e.code}", f"{e.code} {e.reason}")
            continue
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        yield Fetched(r["row"], True, media=("jpg", data), width=w, height=h)


def _run_range(instance, storage: Storage, keys: list[str], config: dict, ops: list[str]) -> dg.ExecuteInProcessResult:
    """One run over every shard (what a single-run backfill of the range launches), with the stages' checks."""
    assets = [*defs.assets, *defs.asset_checks]
    return dg.materialize(
        assets, selection=ops, instance=instance, raise_on_error=True,
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
        run_config={"ops": config}, resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()})


def _run(instance, storage: Storage, ops: list[str], config: dict) -> None:
    assets = list(defs.assets)
    dg.materialize(assets, selection=ops, instance=instance, run_config={"ops": config},
                   resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()})


def _staleness(instance, key: str) -> tuple[StaleStatus, list[str]]:
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    causes = resolver.get_stale_root_causes(dg.AssetKey(key))
    return resolver.get_status(dg.AssetKey(key)), sorted(f"{c.asset_key.to_user_string()}: {c.reason}" for c in causes)


def _requested(result) -> dict[str, int]:
    return {r.key.to_user_string(): r.true_subset.size for r in result.results if r.true_subset.size}


def test_a_changed_shard_of_160_marks_the_whole_dataset_stages_stale_names_it_and_automation_rebuilds_only_them(
        tmp_path, caption_tokenizer):
    assert SHARDS > SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD  # the edge Dagster itself stops checking
    www = tmp_path / "www"
    n = SHARDS * ROWS_PER_SHARD
    missing = CHANGED * ROWS_PER_SHARD + 1
    for i in range(n):
        if i != missing:
            make_jpeg(www / f"img/{i:04d}.jpg", 64 + i % 32, 48 + i % 16, i)
    storage = Storage(str(tmp_path / "root"))
    keys = [f"shard-{i:05d}" for i in range(SHARDS)]
    fetch = {"allow_loopback": True, "processes": 1, "threads": 4, "retries": 0}
    final = {"manifests": {"config": {"tokenizer": caption_tokenizer, "max_seq_len": 512, "hd_num": 1}}}

    with serve_directory(www) as server, dg.instance_for_test() as instance:
        tsv = tmp_path / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"{_caption(i)}\t{server.base_url}/img/{i:04d}.jpg\n" for i in range(n)))
        _run(instance, storage, ["raw_cc3m"], {"raw_cc3m": {"config": {"paths": [str(tsv)], "rows_per_shard": ROWS_PER_SHARD}}})
        assert instance.get_dynamic_partitions("cc3m_shards") == keys

        # one run over every shard, as a single-run backfill launches it: every image is asked for once, the
        # captions are cleaned, and both stages observe their roll-ups
        first = _run_range(instance, storage, keys, {"images_cc3m": {"config": fetch}}, ["images_cc3m", "captions_cc3m"])
        assert len(server.paths) == n
        assert any(f"img2dataset: one run for {n} URL(s) of {SHARDS} shard(s)" in e.user_message
                   for e in instance.all_logs(first.run_id))
        rollup = instance.fetch_observations(dg.AssetKey("images_cc3m_shards"), limit=1).records[0].asset_observation
        assert (rollup.metadata["committed"].value, rollup.metadata["changed"].value) == (SHARDS, SHARDS)
        # the run's per-shard table and contact sheet are logged once, on the roll-up, not on all 160 partitions
        assert len(rollup.metadata["shards"].value.records) == SHARDS and "preview" in rollup.metadata
        md = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("images_cc3m"), asset_partitions=[keys[CHANGED]]), limit=1).records[0].asset_materialization.metadata
        assert "shards" not in md and "preview" not in md and "images_cc3m_shards" in md["run_details"].value
        assert (md["attempted"].value, md["succeeded"].value) == (ROWS_PER_SHARD, ROWS_PER_SHARD - 1)  # its own
        _run(instance, storage, WHOLE, final)
        for key in WHOLE:
            assert _staleness(instance, key) == (StaleStatus.FRESH, []), key
        settled = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert _requested(settled) == {}

        # the missing image appears; a retry over the whole range fetches exactly it, and commits one shard
        make_jpeg(www / f"img/{missing:04d}.jpg", 70, 50, 10_000)
        asked = len(server.paths)
        retry = _run_range(instance, storage, keys, {"images_cc3m": {"config": {**fetch, "retry_failed": True}}},
                           ["images_cc3m"])
        assert server.paths[asked:] == [f"/img/{missing:04d}.jpg"]
        checks = {c.check_name: c for c in retry.get_asset_check_evaluations()}
        assert checks["samples_accounted"].passed and checks["samples_accounted"].metadata["raw_rows"].value == n

        rollup = instance.fetch_observations(dg.AssetKey("images_cc3m_shards"), limit=1).records[0].asset_observation
        assert rollup.metadata["changed_shards"].value == keys[CHANGED]
        assert rollup.metadata["changed"].value == 1 and rollup.metadata["committed"].value == SHARDS
        assert _staleness(instance, "media_hashes") == (StaleStatus.STALE, ["images_cc3m_shards: has a new data version"])
        assert _staleness(instance, "manifests") == (StaleStatus.STALE, ["images_cc3m_shards: has a new data version"])
        # Dagster marks only the direct readers stale; captions_dedup reads media_hashes, which has not changed yet
        assert _staleness(instance, "captions_dedup") == (StaleStatus.FRESH, [])

        changed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=settled.cursor)
        assert _requested(changed) == {k: 1 for k in WHOLE}  # no caption shard, no media shard

        _run(instance, storage, WHOLE, final)
        hashes = instance.get_latest_materialization_event(dg.AssetKey("media_hashes")).asset_materialization
        assert (hashes.metadata["shards_hashed"].value, hashes.metadata["shards_up_to_date"].value) == (1, SHARDS - 1)
        for key in WHOLE:
            assert _staleness(instance, key) == (StaleStatus.FRESH, []), key
        after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=changed.cursor)
        assert _requested(after) == {}

        # a range run that commits nothing new (every shard up to date) changes no roll-up: nothing goes stale
        _run_range(instance, storage, keys, {"images_cc3m": {"config": fetch}}, ["images_cc3m"])
        assert len(server.paths) == asked + 1
        assert _staleness(instance, "media_hashes") == (StaleStatus.FRESH, [])
        assert _requested(dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)) == {}

        # a shard committed outside Dagster (a script fetching shard 7 again): Observe on the roll-up finds it
        shard = raw_shards(storage, "cc3m")[7]
        materialize_shard(storage, dataset="cc3m", shard_key=keys[7], shard_index=7, raw_uri=shard.uri,
                          raw_version=shard.raw_version, options=ImageOptions().content_options(), fetch=_http_fetcher,
                          rows_digest=shard.digest("media"), force=True)
        assert _staleness(instance, "media_hashes") == (StaleStatus.FRESH, [])  # nothing has looked yet
        observe = dg.Definitions(assets=[next(r for r in MEDIA_ROLLUPS if r.key.to_user_string() == "images_cc3m_shards")],
                                 resources={"storage": StorageResource(root=storage.root)})
        assert observe.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance).success
        rollup = instance.fetch_observations(dg.AssetKey("images_cc3m_shards"), limit=1).records[0].asset_observation
        assert (rollup.metadata["changed_shards"].value, rollup.metadata["changed"].value) == (keys[7], 1)
        assert _staleness(instance, "media_hashes") == (StaleStatus.STALE, ["images_cc3m_shards: has a new data version"])
