"""Every run-config file the README shows is valid for the command the README runs it with (the docs match the
code): the assets it names exist, the command selects them, and Dagster accepts every field."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mllm_pipeline.definitions import defs

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
FILES = {name: yaml.safe_load(text) for text, name in re.findall(r"```yaml\n(# ([\w.-]+\.yaml).*?)```", README, flags=re.S)}
COMMANDS = [line for line in README.splitlines() if line.startswith("dagster ") and " -c " in line]


def _selection(argv: list[str]) -> list[str]:
    if "-j" in argv:
        return [k.to_user_string() for k in defs.resolve_job_def(argv[argv.index("-j") + 1]).asset_layer.executable_asset_keys]
    return argv[argv.index("--select") + 1].split(",")


def test_every_config_file_is_used_by_a_command():
    used = {shlex.split(c)[shlex.split(c).index("-c") + 1] for c in COMMANDS}
    assert set(FILES) == used, (sorted(FILES), sorted(used))


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_config_is_valid(command):
    argv = shlex.split(command)
    name = argv[argv.index("-c") + 1]
    config = FILES[name]
    selected = _selection(argv)
    assert set(config["ops"]) <= set(selected), f"{name} configures assets that `{command}` does not select"
    job = dg.define_asset_job("readme_check", selection=selected).resolve(asset_graph=defs.resolve_asset_graph())
    assert dg.validate_run_config(job, config)
