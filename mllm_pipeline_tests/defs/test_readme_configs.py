"""Every run-config file the README and the docs/ pages show is valid for the command they run it with (the docs
match the code): the assets it names exist, the command selects them, and Dagster accepts every field.

A config file is a ```yaml block whose first line is `# <name>.yaml`; a command is a line starting with `dagster `
that passes `-c <name>.yaml`. Blocks and commands are collected from all pages together (a command may use a file
shown on another page), so each file name is shown once across the pages."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mllm_pipeline.definitions import defs

REPO = Path(__file__).resolve().parents[2]
PAGES = {p.relative_to(REPO).as_posix(): p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
BLOCKS = [(page, name, text) for page, doc in PAGES.items()
          for text, name in re.findall(r"```yaml\n(# ([\w.-]+\.yaml).*?)```", doc, flags=re.S)]
FILES = {name: yaml.safe_load(text) for _, name, text in BLOCKS}
COMMANDS = [(page, line) for page, doc in PAGES.items() for line in doc.splitlines()
            if line.startswith("dagster ") and " -c " in line]


def _config_name(command: str) -> str:
    argv = shlex.split(command)
    return argv[argv.index("-c") + 1]


def _selection(argv: list[str]) -> list[str]:
    if "-j" in argv:
        return [k.to_user_string() for k in defs.resolve_job_def(argv[argv.index("-j") + 1]).asset_layer.executable_asset_keys]
    return argv[argv.index("--select") + 1].split(",")


def test_pages_are_read():
    assert "README.md" in PAGES and any(p.startswith("docs/") for p in PAGES)
    assert FILES and COMMANDS


def test_every_config_file_name_is_shown_once():
    shown: dict[str, list[str]] = {}
    for page, name, _ in BLOCKS:
        shown.setdefault(name, []).append(page)
    assert not {n: p for n, p in shown.items() if len(p) > 1}


def test_every_config_file_is_used_by_a_command():
    used = {_config_name(c) for _, c in COMMANDS}
    assert set(FILES) == used, (sorted(FILES), sorted(used))


@pytest.mark.parametrize("page,command", [pytest.param(page, c, id=f"{page}:{_config_name(c)}") for page, c in COMMANDS])
def test_readme_command_config_is_valid(page, command):
    argv = shlex.split(command)
    name = _config_name(command)
    assert name in FILES, f"{page}: `{command}` uses {name}, which no page shows"
    config = FILES[name]
    selected = _selection(argv)
    assert set(config["ops"]) <= set(selected), f"{page}: {name} configures assets that `{command}` does not select"
    job = dg.define_asset_job("readme_check", selection=selected).resolve(asset_graph=defs.resolve_asset_graph())
    assert dg.validate_run_config(job, config)
