"""Table metadata for the UI: rows of dicts as ``dg.MetadataValue.table`` with a schema (column names, types and
descriptions), so counts and per-shard results show as sortable tables instead of JSON blobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg


#: a JSON dict of more keys than this shows as a table instead (:func:`small_json_or_table`)
MAX_JSON_KEYS = 6


def _type(values: list[Any]) -> str:
    seen = {type(v) for v in values if v is not None}
    if seen and seen <= {bool}:
        return "bool"
    if seen and seen <= {int}:
        return "int"
    if seen and seen <= {int, float}:
        return "float"
    return "string"


def _cell(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else str(value)
    if kind == "float":
        return float(value)
    return value


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
          descriptions: Mapping[str, str] | None = None) -> dg.TableMetadataValue:
    """``rows`` as a table: ``columns`` in this order (default: the first row's keys), each typed from its values
    (int, float, bool, else string)."""
    columns = list(columns if columns is not None else (rows[0].keys() if rows else []))
    kinds = {c: _type([r.get(c) for r in rows]) for c in columns}
    schema = dg.TableSchema(columns=[dg.TableColumn(c, kinds[c], description=(descriptions or {}).get(c))
                                     for c in columns])
    records = [dg.TableRecord({c: _cell(r.get(c), kinds[c]) for c in columns}) for r in rows]
    return dg.MetadataValue.table(records, schema=schema)


def counts_table(counts: Mapping[str, int], key: str, value: str = "samples") -> dg.TableMetadataValue:
    """A ``{name: count}`` mapping as a two-column table."""
    return table([{key: k, value: int(v)} for k, v in counts.items()], [key, value])


def small_json_or_table(value: Any) -> Any:
    """A metadata value for a dict or list: JSON while a dict has at most :data:`MAX_JSON_KEYS` keys; a larger dict
    becomes a table, of name and count when every value is an integer, else one row of its fields (when they are
    all scalars)."""
    if isinstance(value, Mapping) and len(value) > MAX_JSON_KEYS:
        values = list(value.values())
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return counts_table(value, "name", "count")
        if all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            return table([dict(value)])
    return dg.MetadataValue.json(value)
