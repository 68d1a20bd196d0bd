"""The accounting checks as Dagster runs them: with the materialization, and on their own (the UI's "Execute"),
where a corrupted committed output makes them fail with a description that names what is missing."""

from __future__ import annotations

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mllm_pipeline.defs.checks import ACCOUNTING_CHECKS
from mllm_pipeline.defs.ingest.assets import raw_cc3m
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.storage import Storage


def test_rows_accounted_runs_alone_and_fails_naming_the_lost_line(tmp_path):
    src = tmp_path / "Train_GCC-training.tsv"
    src.write_text("".join(f"caption number {i}\thttp://x.org/{i}.jpg\n" for i in range(1, 7)) + "broken line\n")
    check = ACCOUNTING_CHECKS["raw_cc3m"]
    resources = {"storage": StorageResource(root=str(tmp_path / "root"))}
    with dg.instance_for_test() as instance:
        result = dg.materialize([raw_cc3m, check], instance=instance, resources=resources,
                                run_config={"ops": {"raw_cc3m": {"config": {"paths": [str(src)]}}}})
        ev = {c.check_name: c for c in result.get_asset_check_evaluations()}["rows_accounted"]
        assert ev.passed and ev.metadata["source_records"].value == 7 and ev.metadata["quarantined"].value == 1

        st = Storage(str(tmp_path / "root"))
        m = st.read_manifest("raw/cc3m")
        shard = tmp_path / "root/raw/cc3m" / m["version"] / m["shards"][0]["file"]
        t = pq.read_table(shard)
        pq.write_table(t.filter(pc.not_equal(t["source_line"], 4)), shard)  # a row lost after the commit

        alone = dg.materialize([raw_cc3m, check], instance=instance, resources=resources,
                               selection=dg.AssetSelection.checks(check), raise_on_error=False)
        assert not alone.asset_materializations_for_node("raw_cc3m")  # nothing was materialized
        ev = alone.get_asset_check_evaluations()[0]
        assert not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR
        assert f"{src}: line 4 is in neither the raw shards nor the quarantine" in ev.description
        assert "line 4" in ev.metadata["first_problems"].value and ev.metadata["problem_count"].value == 2
