"""docker/dagster.yaml against a real PostgreSQL server: storage classes, pools, run queue, and a materialization
made by the `dagster` CLI landing in PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import dagster as dg
import pytest

from mllm_pipeline_tests.deploy.conftest import REPO
from mllm_pipeline_tests.deploy.instance_config import validated_instance_config

DAGSTER_YAML = REPO / "docker" / "dagster.yaml"


def test_docker_dagster_yaml_is_valid_instance_config():
    config = validated_instance_config(DAGSTER_YAML)
    pg = config["storage"]["postgres"]["postgres_db"]
    assert {k: v for k, v in pg.items()} == {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"}, "db_name": {"env": "DAGSTER_PG_DB"},
        "username": {"env": "DAGSTER_PG_USERNAME"}, "password": {"env": "DAGSTER_PG_PASSWORD"},
        "scheme": "postgresql+psycopg2",
    }
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_monitoring"]["enabled"] is True and config["run_monitoring"]["max_runtime_seconds"] > 0
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0  # a killed run's pool slots come back
    assert config["concurrency"]["pools"]["default_limit"] == 1  # the gpu pool: one training step at a time
    assert config["concurrency"]["runs"]["max_concurrent_runs"] > 0
    assert config["telemetry"]["enabled"] is False


def test_local_default_is_still_sqlite(tmp_path):
    (tmp_path / "dagster.yaml").write_text("")  # what scripts/setup.sh writes into .dagster_home
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"


@pytest.fixture
def pg_home(tmp_path, postgres, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DAGSTER_YAML, home / "dagster.yaml")
    for k, v in postgres.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def test_instance_from_docker_yaml_runs_on_postgres(pg_home, postgres):
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_runtime_seconds == 86400
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 6

        # pools: a pool with no limit of its own gets the default (gpu: 1); downloads is set the way compose does it
        assert instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
    subprocess.run([sys.executable, "-m", "dagster", "instance", "concurrency", "set", "downloads", "4"],
                   check=True, capture_output=True, text=True)
    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT concurrency_key, count(*) FROM concurrency_slots GROUP BY concurrency_key ORDER BY 1")
        assert cur.fetchall() == [("downloads", 4), ("gpu", 1)]


def test_cli_materialization_lands_in_postgres(pg_home, postgres, tmp_path):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a dog on a beach\thttp://example.org/1.jpg\na red car\thttp://example.org/2.jpg\n"
                   "no url here\t\n")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"ops": {"raw_cc3m": {"config": {"paths": [str(tsv)]}}}}))
    env = {**os.environ, "MLLM_STORAGE_ROOT": str(tmp_path / "root")}
    out = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "mllm_pipeline.definitions",
                          "--select", "raw_cc3m", "-c", str(config)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM event_logs WHERE asset_key = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
                    (dg.AssetKey("raw_cc3m").to_string(),))
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT status FROM runs")
        assert [r[0] for r in cur.fetchall()] == ["SUCCESS"]
        cur.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'cc3m_shards'")
        assert [r[0] for r in cur.fetchall()] == ["shard-00000"]

    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("raw_cc3m"))
        md = event.asset_materialization.metadata
        assert (md["rows_in"].value, md["rows_kept"].value, md["rows_quarantined"].value) == (3, 2, 1)
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("raw_cc3m"), "rows_accounted")])
        assert checks and next(iter(checks.values())).status.value == "SUCCEEDED"
