"""A raw version that sets aside too much is refused at commit, before it becomes current: the committed version,
its shard partitions and everything downstream stay as they were (the gate, :mod:`mllm_pipeline.stages.gate`)."""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.defs.ingest.assets import RAW_ASSETS
from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.storage import Storage

ASSET = next(a for a in RAW_ASSETS if a.key.to_user_string() == "raw_cc3m")


def _run(tmp_path, instance, config):
    return dg.materialize([ASSET], instance=instance, resources={"storage": StorageResource(root=str(tmp_path / "root"))},
                          run_config={"ops": {"raw_cc3m": {"config": config}}}, raise_on_error=False)


def _failure(result) -> str:
    return next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error.message


def test_a_file_of_malformed_lines_does_not_replace_a_good_version(tmp_path):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("".join(f"a photo of thing {i} on a table\thttp://example.org/{i}.jpg\n" for i in range(30)))
    st = Storage(str(tmp_path / "root"))
    with dg.instance_for_test() as instance:
        assert _run(tmp_path, instance, {"paths": [str(tsv)], "rows_per_shard": 10}).success
        good = st.read_manifest("raw/cc3m")["version"]
        assert instance.get_dynamic_partitions("cc3m_shards") == ["shard-00000", "shard-00001", "shard-00002"]

        tsv.write_text("".join(f"broken line {i} without a tab\n" for i in range(30)))  # every line malformed
        result = _run(tmp_path, instance, {"paths": [str(tsv)], "rows_per_shard": 10})
        assert not result.success
        msg = _failure(result)
        assert "within_quarantine_ceiling" in msg and "no row was kept" in msg and "stays current" in msg
        assert st.read_manifest("raw/cc3m")["version"] == good
        assert instance.get_dynamic_partitions("cc3m_shards") == ["shard-00000", "shard-00001", "shard-00002"]

        # 12 of 30 malformed: 40 % is under the default ceiling (50 %) but over a stricter one
        tsv.write_text("".join(f"a photo of thing {i} on a table\thttp://example.org/{i}.jpg\n" if i >= 12 else
                               f"broken line {i}\n" for i in range(30)))
        result = _run(tmp_path, instance, {"paths": [str(tsv)], "max_quarantine_rate": 0.2})
        assert not result.success and "above the ceiling max_quarantine_rate = 0.2" in _failure(result)
        assert st.read_manifest("raw/cc3m")["version"] == good
        assert _run(tmp_path, instance, {"paths": [str(tsv)]}).success
        m = st.read_manifest("raw/cc3m")
        assert m["version"] != good and m["rows_kept"] == 18 and "within_quarantine_ceiling" in m["checks"]


def test_a_ceiling_out_of_range_is_an_error_before_reading(tmp_path):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a photo\thttp://example.org/1.jpg\n")
    with dg.instance_for_test() as instance:
        result = _run(tmp_path, instance, {"paths": [str(tsv)], "max_quarantine_rate": 1.5})
    assert not result.success and "max_quarantine_rate must be between 0 and 1" in _failure(result)


def test_a_folder_or_a_symlink_loop_as_input_is_a_message_not_a_traceback(tmp_path):
    folder = tmp_path / "cc3m"
    folder.mkdir()
    loop = tmp_path / "loop.tsv"
    loop.symlink_to(tmp_path / "loop2.tsv")
    (tmp_path / "loop2.tsv").symlink_to(loop)
    with dg.instance_for_test() as instance:
        msg = _failure(_run(tmp_path, instance, {"paths": [str(folder)]}))
        assert "is a folder, not a file" in msg and f"{folder}/*.json" in msg
        msg = _failure(_run(tmp_path, instance, {"paths": [str(loop)]}))
        assert str(loop) in msg and "Nothing was written" in msg
