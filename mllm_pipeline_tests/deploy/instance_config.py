"""Validate a dagster.yaml with Dagster's own instance-config validation (shared by the deployment tests)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def validated_instance_config(path: Path) -> dict[str, Any]:
    """The instance config in ``path``, validated by Dagster the way ``DagsterInstance.get()`` does it."""
    from dagster._core.instance.config import dagster_instance_config

    with tempfile.TemporaryDirectory() as home:
        shutil.copy(path, Path(home) / "dagster.yaml")
        config, custom_class = dagster_instance_config(home)
    assert custom_class is None
    return dict(config)
