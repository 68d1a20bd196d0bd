"""The import structure docs/layout.md draws is the code's: which package imports which, and that the domain
packages import neither Dagster nor the stages above them."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mllm_pipeline"

#: package -> the packages of mllm_pipeline it may import (docs/layout.md, "Who imports whom")
ALLOWED = {
    "definitions": {"defs"},
    "defs": {"stages", "storage", "sources", "download", "text", "vision", "manifests", "exports", "train", "demo",
             "redact", "tracking"},
    "stages": {"sources", "download", "text", "vision", "manifests", "exports", "train", "storage", "redact"},
    "sources": {"storage", "redact"},
    "download": {"storage", "redact", "tracking"},
    "text": set(),
    "vision": set(),
    "model": set(),
    "exports": {"vision"},
    "manifests": {"storage", "vision"},
    "train": {"model", "storage", "vision", "manifests", "tracking"},
    "demo": {"stages", "sources", "exports", "storage"},
    "storage": set(),
    "redact": set(),
    "shard_range": {"sources", "stages", "storage"},
    "config_reference": {"definitions"},
    "tracking": {"redact"},
}
DOMAIN = ("sources", "download", "text", "vision", "model", "exports", "manifests", "train", "stages", "storage",
          "redact", "tracking")


def _imports() -> dict[str, dict[str, set[str]]]:
    """package -> imported top-level name -> the files that import it (relative imports resolved)."""
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE).parts
        pkg = rel[0][:-3] if len(rel) == 1 else rel[0]
        for node in ast.walk(ast.parse(f.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    names.append(".".join(("mllm_pipeline", *rel[:-1][: len(rel) - node.level])) + "." + (node.module or ""))
                elif node.module:
                    names.append(node.module)
            elif isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "mllm_pipeline" and len(parts) > 1:
                    out[pkg][parts[1]].add(str(f.relative_to(PACKAGE)))
                elif parts[0] in ("dagster", "dagster_pipes", "dagster_k8s"):
                    out[pkg][parts[0]].add(str(f.relative_to(PACKAGE)))
    return out


def test_every_package_imports_only_what_the_layout_allows():
    imports = _imports()
    assert set(imports) <= set(ALLOWED) | {"__init__"}, sorted(set(imports) - set(ALLOWED))
    wrong = {(pkg, target): sorted(files) for pkg, targets in imports.items() for target, files in targets.items()
             if target not in ALLOWED.get(pkg, set()) | {pkg} and not target.startswith("dagster")}
    assert not wrong, wrong


def test_domain_packages_do_not_import_dagster():
    """Only defs/ and definitions.py import Dagster; the processes launched through Pipes (the training entry point,
    the video2dataset worker) import the dependency-free dagster_pipes only."""
    imports = _imports()
    wrong = {(pkg, t): sorted(files) for pkg in DOMAIN for t, files in imports.get(pkg, {}).items()
             if t.startswith("dagster") and not (pkg in ("train", "download") and t == "dagster_pipes")}
    assert not wrong, wrong
