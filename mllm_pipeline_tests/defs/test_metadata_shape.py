"""What the UI shows: every asset says what it is, and results come as tables, not JSON blobs."""

from __future__ import annotations

import dagster as dg

from mllm_pipeline.definitions import defs
from mllm_pipeline.defs.tables import MAX_JSON_KEYS, small_json_or_table, table
from mllm_pipeline_tests.metadata import MAX_DICT_KEYS, blobs, table_rows


def test_every_asset_has_a_description():
    graph = defs.resolve_asset_graph()
    missing = [k.to_user_string() for k in graph.get_all_asset_keys()
               if not (graph.get(k).description or "").strip()]
    assert not missing, missing


def test_tables_carry_a_typed_schema():
    value = table([{"dataset": "cc3m", "split": "train", "samples": 3, "rate": 0.5},
                   {"dataset": "coco", "split": "val", "samples": 1, "rate": None}])
    assert [(c.name, c.type) for c in value.schema.columns] == [
        ("dataset", "string"), ("split", "string"), ("samples", "int"), ("rate", "float")]
    assert table_rows(value)[1] == {"dataset": "coco", "split": "val", "samples": 1, "rate": None}


def test_large_dicts_become_tables_and_small_ones_stay_json():
    assert MAX_JSON_KEYS == MAX_DICT_KEYS
    small = small_json_or_table({"train": 3, "test": 1})
    assert isinstance(small, dg.JsonMetadataValue)
    counts = small_json_or_table({f"reason_{i}": i for i in range(8)})
    assert table_rows(counts)[7] == {"name": "reason_7", "count": 7}
    record = small_json_or_table({f"field_{i}": ("x" if i % 2 else i) for i in range(8)})
    assert len(table_rows(record)) == 1
    assert blobs({"a": dg.MetadataValue.json({str(i): i for i in range(7)}), "b": small}) == {"a": 7}
