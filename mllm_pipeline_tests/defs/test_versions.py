"""Operating the pipeline over time through the real Dagster CLI: unchanged inputs cost nothing, an edited row
re-fetches only its shard, committed manifests keep their media through re-ingests, re-fetches, retries and new
caption versions, inputs that disagree stop the manifests with a message, and an empty config touches nothing.
Real img2dataset downloads from a loopback server the test starts."""

from __future__ import annotations

import contextlib
import os

import pyarrow.parquet as pq

from mllm_pipeline.storage import Storage
from mllm_pipeline_tests.defs.test_media_assets import FAST, Cli, _corpus, _requested, _tsv
from mllm_pipeline_tests.download.conftest import make_jpeg
from mllm_pipeline_tests.media_server import serve_directory


def _versions(storage: Storage) -> set[str]:
    """Every committed version directory under the root."""
    root = storage._p("")
    return {os.path.relpath(os.path.dirname(p), root) for p in storage.fs.find(root) if p.endswith("/_version.json")}


@contextlib.contextmanager
def _cc3m(tmp_path, n: int, rows_per_shard: int, missing: frozenset[int] = frozenset()):
    """n loopback JPEGs, a CC3M TSV naming them, and raw_cc3m materialized through the CLI:
    (server, www, tsv, cli, storage, raw config)."""
    www = _corpus(tmp_path, n, missing=missing)
    with serve_directory(www) as server:
        tsv = _tsv(tmp_path, server.base_url, n)
        cli = Cli(tmp_path)
        raw_cfg = {"paths": [str(tsv)], "rows_per_shard": rows_per_shard}
        cli.run("raw_cc3m", raw_cfg)
        yield server, www, tsv, cli, Storage(str(cli.root)), raw_cfg


def test_unchanged_inputs_cost_nothing_and_an_edited_row_refetches_one_shard(tmp_path):
    with _cc3m(tmp_path, 20, 10) as (server, _, tsv, cli, storage, raw_cfg):
        cli.run("images_cc3m", FAST, partition_range="shard-00000...shard-00001")
        cli.run("captions_cc3m", {}, partition_range="shard-00000...shard-00001")
        assert len(server.paths) == 20
        before = _versions(storage)
        shard0 = storage.read_manifest("media/cc3m/shard-00000")["version"]

        # the same file, touched (a new mtime, as a copy or a sensor would see it): every stage is up to date
        st = os.stat(tsv)
        os.utime(tsv, (st.st_atime + 100, st.st_mtime + 100))
        out = cli.run("raw_cc3m", raw_cfg)
        assert "up to date" in out.stderr
        cli.run("images_cc3m", FAST, partition_range="shard-00000...shard-00001")
        out = cli.run("captions_cc3m", {}, partition_range="shard-00000...shard-00001")
        assert "up to date" in out.stderr
        assert len(server.paths) == 20, "an unchanged shard was fetched again"
        assert _versions(storage) == before, "an unchanged input wrote a new version"

        # one row of shard 1 edited in place: only shard 1 is fetched again, shard 0 keeps its version
        lines = tsv.read_text().splitlines()
        lines[15] = lines[15].replace("img/015.jpg", "img/015.jpg?v=2")
        tsv.write_text("\n".join(lines) + "\n")
        cli.run("raw_cc3m", raw_cfg)
        seen = len(server.paths)
        cli.run("images_cc3m", FAST, partition_range="shard-00000...shard-00001")
        assert sorted(_requested(server, seen)) == sorted([f"{i:03d}.jpg" for i in range(10, 15)]
                                                          + ["015.jpg?v=2"] + [f"{i:03d}.jpg" for i in range(16, 20)])
        assert storage.read_manifest("media/cc3m/shard-00000")["version"] == shard0
        assert all(v in _versions(storage) for v in before), "a committed version was deleted by a commit"


def _manifest_tars(storage: Storage) -> tuple[str, set[str]]:
    m = storage.read_manifest("manifests")
    tars = set()
    for split in ("train", "val", "test"):
        rel = f"manifests/{m['version']}/{split}.parquet"
        if storage.exists(rel):
            tars |= set(pq.read_table(storage.uri(rel), columns=["media_tar"])["media_tar"].to_pylist())
    return m["version"], tars


def test_committed_manifests_keep_their_media_and_disagreeing_inputs_stop_with_a_message(tmp_path, caption_tokenizer):
    with _cc3m(tmp_path, 20, 10, missing=frozenset({3, 13})) as (_, www, tsv, cli, storage, raw_cfg):
        rng = "shard-00000...shard-00001"
        cli.run("images_cc3m", FAST, partition_range=rng)
        cli.run("captions_cc3m", {}, partition_range=rng)
        cli.run("media_hashes", {"workers": 1})
        cli.run("captions_dedup", {})
        cli.run("manifests", {"val_fraction": 0.0, "tokenizer": caption_tokenizer})
        version, tars = _manifest_tars(storage)
        assert len(tars) == 2
        out = cli.run("manifests", {"val_fraction": 0.0, "tokenizer": caption_tokenizer})
        assert "up to date" in out.stderr and storage.read_manifest("manifests")["version"] == version

        # a forced re-fetch, a nightly retry_failed and a new caption version: each commits a new version
        make_jpeg(www / "img/003.jpg", 120, 90, 3)
        cli.run("images_cc3m", {**FAST, "force": True}, partition="shard-00000")
        cli.run("images_cc3m", {**FAST, "retry_failed": True}, partition="shard-00001")
        cli.run("captions_cc3m", {"min_words": 4}, partition_range=rng)
        for tar in tars:  # ... and every tar the committed manifests name is still there
            assert storage.exists(tar), f"{tar} was deleted while the manifests {version} read it"
        assert storage.exists(f"manifests/{version}/train.parquet")

        # the annotation file shrinks to one shard: the committed outputs of shard 1 are no longer part of the
        # data; shard 0's captions are stale until re-materialized, and the manifests say so
        tsv.write_text("\n".join(tsv.read_text().splitlines()[:10]).replace("object number 4 ", "object no 4 ") + "\n")
        cli.run("raw_cc3m", raw_cfg)
        proc = cli.run_failing("manifests", {"val_fraction": 0.0, "tokenizer": caption_tokenizer})
        assert "captions_cc3m for shard-00000 was made from other data than raw_cc3m's current version" in proc
        assert "materialize captions_cc3m for shard-00000" in proc
        cli.run("captions_cc3m", {"min_words": 4}, partition="shard-00000")
        cli.run("media_hashes", {"workers": 1})
        cli.run("captions_dedup", {})
        cli.run("manifests", {"val_fraction": 0.0, "tokenizer": caption_tokenizer})
        new_version, new_tars = _manifest_tars(storage)
        assert new_version != version and len(new_tars) == 1
        for tar in tars:
            assert storage.exists(tar)


def test_empty_config_fails_clearly_and_leaves_the_data_and_partitions_alone(tmp_path):
    with _cc3m(tmp_path, 10, 5) as (_, _, _, cli, storage, _):
        before = storage.read_manifest("raw/cc3m")
        out = cli.run_failing("raw_cc3m", {})
        assert "config 'paths' is empty" in out and "Nothing was read or written" in out
        assert storage.read_manifest("raw/cc3m") == before
        with cli.instance() as instance:
            assert instance.get_dynamic_partitions("cc3m_shards") == ["shard-00000", "shard-00001"]
        assert not (cli.root / "demo").exists()  # the demo corpus was not generated either
