"""``source scripts/setup.sh`` in a user's interactive shell sets the environment up and leaves the shell's own
options alone: a failing command afterwards does not close the terminal."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sourcing_setup_leaves_the_interactive_shell_options_alone():
    out = subprocess.run(["bash", "-ic", "source scripts/setup.sh >/dev/null 2>&1; echo \"opts=$-\"; false; "
                          "echo still-here; command -v dagster; echo \"home=$DAGSTER_HOME\""],
                         cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLLM_VENV")})
    lines = out.stdout.splitlines()
    opts = next(x for x in lines if x.startswith("opts="))
    assert "e" not in opts.removeprefix("opts=") and "u" not in opts.removeprefix("opts="), opts
    assert "still-here" in lines
    assert str(REPO / ".venv/bin/dagster") in lines and f"home={REPO / '.dagster_home'}" in lines
