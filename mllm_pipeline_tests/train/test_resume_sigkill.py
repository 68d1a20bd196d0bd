"""Exact resume under the defaults that matter: P-LoRA dropout on, DataLoader workers on, and a real ``kill -9``.

A run is killed with SIGKILL right after the step following a checkpoint (the process gets no chance to clean up;
its DataLoader workers are orphaned), then started again on the same output directory. Its losses and its final
weights must equal those of an uninterrupted run bit for bit: the checkpoint restores the global RNG, and nothing
may draw from it before the next step does (the DataLoader's iterator seeds its workers from a generator of its
own). One process, then FSDP2 over two gloo processes. Every run is a fresh process with one intra-op thread, so
the uninterrupted and the resumed runs compute alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mllm_pipeline.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, os, signal, sys
from mllm_pipeline.train.config import TrainConfig
from mllm_pipeline.train.loop import train

root, output, config, kill_at = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])

def on_log(rec):
    if rec["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

train(TrainConfig.from_dict(config), root, output, on_log=on_log)
"""
#: dropout on, and the P-LoRA of the 4KHD release: q/k/v share one A (one dropout mask), per-module rank and alpha
OFFICIAL_PLORA = {"lora_fused": {"qkv": ["q_proj", "k_proj", "v_proj"]},
                  "lora_modules": {"q_proj": [8, 16.0], "k_proj": [8, 16.0], "v_proj": [8, 16.0], "o_proj": [16, 16.0],
                                   "gate_proj": [16, 16.0], "up_proj": [16, 16.0], "down_proj": [16, 16.0]}}
CONFIG = {"lr": 2e-3, "max_steps": 6, "warmup_steps": 1, "tokens_per_batch": 800, "checkpoint_every": 3, "seed": 3,
          "device": "cpu", "loader": "workers", "num_workers": 2,
          "model": {"tiny": True, "lora_dropout": 0.1, **OFFICIAL_PLORA}}


def _run(script: Path, root: str, output: Path, config: dict, kill_at: int, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(procs)]
    return subprocess.run([*launcher, str(script), root, str(output), json.dumps(config), str(kill_at)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def _check_kill_and_resume(manifest_root, tmp_path: Path, config: dict, procs: int) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    straight = _run(script, manifest_root.root, tmp_path / "straight", config, kill_at=0, procs=procs)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    killed = _run(script, manifest_root.root, tmp_path / "resumed", config, kill_at=4, procs=procs)
    assert killed.returncode != 0  # SIGKILL at step 4: step 3 is the last checkpoint
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003"] and not (tmp_path / "resumed" / "model").exists()
    assert len(read_metrics(tmp_path / "resumed")) == 4  # step 4 ran and was logged, then the kill
    resumed = _run(script, manifest_root.root, tmp_path / "resumed", config, kill_at=0, procs=procs)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3

    a = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    b = [r["loss"] for r in read_metrics(tmp_path / "resumed")]
    assert len(a) == len(b) == 6 and a == b, (a, b)  # bit for bit (the floats as written)
    wa = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and "llm.model.layers.0.self_attn.qkv.lora_A.weight" in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]


def test_sigkill_and_resume_with_dropout_and_workers(manifest_root, tmp_path):
    _check_kill_and_resume(manifest_root, tmp_path, CONFIG, procs=1)


def test_sigkill_and_resume_under_fsdp2_on_two_processes(manifest_root, tmp_path):
    _check_kill_and_resume(manifest_root, tmp_path, {**CONFIG, "tokens_per_batch": 400, "fsdp": True}, procs=2)


def test_dropout_changes_the_run(manifest_root, tmp_path, dropout=0.1):
    """The resume tests above are not vacuous: with the same seed, a run with LoRA dropout trains to other
    weights than one without (the dropout masks are drawn from the RNG the checkpoint restores)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    outs = {}
    for p in (0.0, dropout):
        cfg = {**CONFIG, "max_steps": 3, "checkpoint_every": 0, "model": {**CONFIG["model"], "lora_dropout": p}}
        proc = _run(script, manifest_root.root, tmp_path / f"d{p}", cfg, kill_at=0)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[p] = load_file(str(tmp_path / f"d{p}" / "model" / "model.safetensors"))
    changed = [k for k in outs[0.0] if ".lora_" in k and not torch.equal(outs[0.0][k], outs[dropout][k])]
    assert changed
