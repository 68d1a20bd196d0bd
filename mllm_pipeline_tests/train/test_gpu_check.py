"""bench/gpu_check.sh runs end to end in its reduced CPU mode (the GPU figures need a GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_in_reduced_mode(tmp_path):
    env = {**os.environ, "GPU_CHECK_REDUCED": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["packed"] is True and train["tokens_per_s"] > 0
    assert (tmp_path / "hd.json").exists() and "== done" in proc.stdout
    loader = json.loads((tmp_path / "loader.json").read_text())
    assert loader["thread"]["samples"] == loader["workers"]["samples"] == 8 and loader["workers"]["samples_per_s"] > 0
