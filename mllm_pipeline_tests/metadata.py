"""Reading Dagster table metadata in tests, and the shape every asset's metadata keeps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

#: a JSON dict metadata value with more keys than this belongs in a table (dg.MetadataValue.table)
MAX_DICT_KEYS = 6


def table_rows(value: Any) -> list[dict[str, Any]]:
    """The rows of a ``dg.MetadataValue.table`` as dicts."""
    assert isinstance(value, dg.TableMetadataValue), type(value)
    return [dict(r.data) for r in value.records]


def table_column(value: Any, column: str) -> list[Any]:
    return [row[column] for row in table_rows(value)]


def blobs(metadata: Mapping[str, Any], limit: int = MAX_DICT_KEYS) -> dict[str, int]:
    """The entries of ``metadata`` that are JSON dicts (at any depth) of more than ``limit`` keys: ``{key: size}``."""
    def widest(v: Any) -> int:
        if isinstance(v, Mapping):
            return max([len(v), *(widest(x) for x in v.values())])
        if isinstance(v, list):
            return max([0, *(widest(x) for x in v)])
        return 0

    out = {}
    for key, value in metadata.items():
        raw = value.value if isinstance(value, dg.JsonMetadataValue) else value
        if isinstance(raw, (Mapping, list)) and widest(raw) > limit:
            out[key] = widest(raw)
    return out
