"""What ``pip install .`` installs: the ``mllm_pipeline`` package, all of it, and nothing else (no tests, no
benchmarks); and no installed module needs the tests or pytest to import."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mllm_pipeline"
NOT_INSTALLED = ("mllm_pipeline_tests", "pytest")  # what an installed module must never import
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "out")


def _package_files(root: Path) -> list[Path]:
    """Every file of the package under ``root`` (bytecode caches and hidden files aside), relative to ``root``."""
    return sorted(p.relative_to(root) for p in (root / PACKAGE).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, list[str]]:
    """The wheel built from a copy of the checkout (so the build leaves no ``build/`` or stale ``build/lib`` in the
    working tree); the copy keeps the tests and benchmarks next to the package, as in the repository, so the
    package discovery has them to wrongly pick up. ``--no-build-isolation``: setuptools comes from this environment
    (no index needed)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, dist = tmp / "src", tmp / "dist"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in (PACKAGE, "mllm_pipeline_tests", "bench"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=_IGNORE)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "-q", "-w", str(dist), str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
    return src, names


def test_wheel_holds_the_package_and_nothing_else(wheel):
    src, names = wheel
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {PACKAGE}, f"the wheel installs more than {PACKAGE}: {sorted(top)}"
    assert not [n for n in names if n.startswith(("mllm_pipeline_tests", "bench/", "bench.py"))]
    for needed in ("mllm_pipeline/definitions.py", "mllm_pipeline/stages/gate.py", "mllm_pipeline/demo/generate.py"):
        assert needed in names
    assert "mllm_pipeline/demo/server.py" not in names  # the fault-injecting server is the tests' (media_server.py)


def test_every_package_file_ships(wheel):
    """All of ``mllm_pipeline/``: every module (sub-packages without ``__init__.py`` included) and any data file
    next to them (a data file missing here needs ``[tool.setuptools.package-data]``)."""
    src, names = wheel
    missing = [str(p) for p in _package_files(src) if p.as_posix() not in names]
    assert not missing, f"in mllm_pipeline/ but not in the wheel: {missing}"


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def test_installed_modules_import_neither_the_tests_nor_pytest():
    bad = []
    for rel in _package_files(REPO):
        if rel.suffix != ".py":
            continue
        tree = ast.parse((REPO / rel).read_text(encoding="utf-8"), filename=str(rel))
        bad += [f"{rel}:{line}: {mod}" for line, mod in _imports(tree) if mod.split(".", 1)[0] in NOT_INSTALLED]
    assert not bad, "installed modules that import the tests or pytest:\n" + "\n".join(bad)
