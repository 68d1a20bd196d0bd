"""The per-asset config reference (``docs/config-reference.md``), generated from the config schemas Dagster itself
builds from the config classes, so it cannot drift from the code: every field of every configurable asset and
resource, with its type, default and description.

Regenerate it after changing a config class::

    python -m mllm_pipeline.config_reference > docs/config-reference.md

(a test compares the committed page with this output).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import dagster as dg
from dagster._config import ConfigTypeKind  # not exported at the top level in 1.13

HEADER = """# Config reference

Every config field of every asset and resource, generated from the config classes
(`python -m mllm_pipeline.config_reference > docs/config-reference.md`; a test keeps this page equal to that output).
In a run config file an asset's fields go under `ops: {<asset>: {config: {...}}}`, a resource's under
`resources: {<resource>: {config: {...}}}`; the launchpad shows the same fields with these descriptions. Partitioned
assets of the same stage share one config class (e.g. every `images_*` asset has the fields shown for one).
"""


def type_name(t: Any) -> str:
    kind = t.kind
    if kind == ConfigTypeKind.SCALAR:
        return {"String": "string", "Int": "int", "Float": "float", "Bool": "bool"}.get(t.given_name, t.given_name)
    if kind == ConfigTypeKind.ARRAY:
        return f"list of {type_name(t.inner_type)}"
    if kind == ConfigTypeKind.NONEABLE:
        return f"{type_name(t.inner_type)} or null"
    if kind == ConfigTypeKind.MAP:
        return f"map of {type_name(t.key_type)} to {type_name(t.inner_type)}"
    if kind == ConfigTypeKind.ENUM:
        return "one of " + ", ".join(v.config_value for v in t.enum_values)
    if kind == ConfigTypeKind.PERMISSIVE_SHAPE:
        return "mapping (any keys)"
    if kind in (ConfigTypeKind.STRICT_SHAPE, ConfigTypeKind.PERMISSIVE_SHAPE):
        return "mapping"
    if kind == ConfigTypeKind.ANY:
        return "any"
    if kind == ConfigTypeKind.SCALAR_UNION:
        return type_name(t.scalar_type)  # the other member is Dagster's {env: VAR} selector
    return str(kind.value).lower()


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def field_rows(fields: dict[str, Any], prefix: str = "") -> list[str]:
    rows = []
    for name, f in fields.items():
        t = f.config_type
        default = json.dumps(f.default_value) if f.default_provided else ("required" if f.is_required else "")
        rows.append(f"| `{prefix}{name}` | {_cell(type_name(t))} | {_cell('`' + default + '`' if default and default != 'required' else default)} "
                    f"| {_cell(f.description or '')} |")
        if t.kind in (ConfigTypeKind.STRICT_SHAPE, ConfigTypeKind.PERMISSIVE_SHAPE) and t.fields:
            rows += field_rows(t.fields, f"{prefix}{name}.")
    return rows


def _table(fields: dict[str, Any]) -> str:
    return "| field | type | default | description |\n|---|---|---|---|\n" + "\n".join(field_rows(fields)) + "\n"


def render(defs: dg.Definitions) -> str:
    graph = defs.resolve_asset_graph()
    by_class: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        ad = node.assets_def
        if not ad.is_executable:
            continue
        try:
            field = ad.op.config_field
        except Exception:  # an asset without an op config
            continue
        if field is None or field.config_type.kind not in (ConfigTypeKind.STRICT_SHAPE, ConfigTypeKind.PERMISSIVE_SHAPE):
            continue
        fields = field.config_type.fields
        if not fields:
            continue
        signature = json.dumps(sorted(field_rows(fields)))
        by_class.setdefault(signature, []).append((key.to_user_string(), node.group_name or "default", fields))
    out = [HEADER, "\n## Assets\n"]
    groups = sorted(by_class.values(), key=lambda items: (items[0][1], items[0][0]))
    for items in groups:
        names = [n for n, _, _ in items]
        title = names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"
        out.append(f"\n### `{title}`\n\nGroup `{items[0][1]}`." + ("" if len(names) == 1 else
                   " The same fields for: " + ", ".join(f"`{n}`" for n in names) + ".") + "\n\n" + _table(items[0][2]))
    out.append("\n## Resources\n")
    for name, res in sorted((defs.resources or {}).items()):
        if not isinstance(res, dg.ConfigurableResource):
            continue
        fields = res.to_config_schema().as_field().config_type.fields
        if fields:
            out.append(f"\n### `{name}`\n\n{_cell((type(res).__doc__ or '').strip().split(chr(10) * 2)[0])}\n\n" + _table(fields))
    return "".join(out)


if __name__ == "__main__":
    from mllm_pipeline.definitions import defs as _defs

    sys.stdout.write(render(_defs))
