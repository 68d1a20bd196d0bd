"""Training with tracking on: W&B (offline) and TensorBoard get every logged step of metrics.jsonl, the run's config
and manifests version, from rank 0; the asset links to both. Nothing leaves the machine (W&B offline)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.defs.train import train_mllm
from mllm_pipeline.stages.checkpoints import PREFIX
from mllm_pipeline.tracking import LINKS_FILE, TrackingSettings, training_metrics
from mllm_pipeline.train.cli import main
from mllm_pipeline.train.loop import read_metrics
from mllm_pipeline_tests.tracking_readers import offline_runs, read_offline_run, tensorboard_scalars


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B that cannot reach the network: offline mode, its files in tmp, no prompts, no API key."""
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return wandb_dir


def _assert_matches(rows: list[dict], history: dict[str, dict[int, float]]) -> None:
    """Every value of every metrics.jsonl row is in ``history`` (``{name: {step: value}}``) at its step."""
    assert rows
    for row in rows:
        for name, value in training_metrics(row).items():
            assert row["step"] in history.get(name, {}), (name, row["step"], sorted(history.get(name, {})))
            assert history[name][row["step"]] == pytest.approx(value, rel=1e-6), (name, row["step"])


def test_cli_logs_every_step_to_wandb_and_tensorboard(manifest_root, tmp_path, offline_wandb):
    out = tmp_path / "out"
    settings = TrackingSettings(wandb=True, mode="offline", project="mllm-test", run_name="tiny-sft",
                                wandb_dir=str(offline_wandb), tensorboard=True, tensorboard_dir=str(tmp_path / "tb"))
    config = {"stage": "sft", "lr": 1e-2, "llm_lr_scale": 1.0, "max_steps": 6, "warmup_steps": 1,
              "tokens_per_batch": 4096, "val_every": 3, "val_batches": 2}
    argv = ["--storage-root", manifest_root.root, "--output", str(out), "--config", json.dumps(config),
            "--val-split", "train", "--tracking", settings.to_json()]  # validation on the train split: the fixture has no val
    assert main(argv) == 0

    rows = read_metrics(out)
    assert len(rows) == 6 and [r["step"] for r in rows] == list(range(1, 7))
    assert all("grad_norm" in r and r["grad_norm"] > 0 for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]

    (run,) = offline_runs(offline_wandb)
    assert (run.name, run.group, run.project, run.job_type) == ("tiny-sft", "tiny-sft", "mllm-test", "train")
    history = {name: run.series(name) for name in {k for r in run.history for k in r}}
    _assert_matches(rows, history)
    assert set(history["val/loss"]) == {3, 6}
    assert run.config["train"]["max_steps"] == 6 and run.config["train"]["val_every"] == 3
    trained_on = json.loads((out / "train_config.json").read_text())["manifests"]["version"]
    assert run.config["manifests"]["version"] == trained_on
    summary = json.loads((out / "summary.json").read_text())
    assert run.summary["final_loss"] == pytest.approx(summary["final_loss"]) and run.summary["steps"] == 6

    links = json.loads((out / LINKS_FILE).read_text())
    assert Path(links["wandb_run_dir"]) == run.directory
    scalars = tensorboard_scalars(links["tensorboard_log_dir"])
    _assert_matches(rows, scalars)
    assert Path(links["tensorboard_log_dir"]).is_relative_to(tmp_path / "tb")


def test_train_asset_links_to_its_tracked_run(manifest_root, tmp_path, offline_wandb):
    tracking = TrackingResource(wandb=True, mode="offline", project="mllm-test", wandb_dir=str(offline_wandb),
                                tensorboard=True, tensorboard_dir=str(tmp_path / "tb"))
    config = {"tiny": True, "max_steps": 3, "lr": 1e-2, "stage": "sft", "tokens_per_batch": 4096,
              "options": {"llm_lr_scale": 1.0, "seed": 7}}  # a run of its own (not up to date)
    result = dg.materialize([train_mllm], resources={"storage": StorageResource(root=manifest_root.root),
                                                     "tracking": tracking},
                            run_config={"ops": {"train_mllm": {"config": config}}})
    md = result.asset_materializations_for_node("train_mllm")[0].metadata
    run = read_offline_run(md["wandb_run"].value)
    assert run.name == "train_mllm" and run.job_type == "train"
    manifest = manifest_root.read_manifest(PREFIX)
    rows = [json.loads(line) for line in manifest_root.read_bytes(f"{PREFIX}/{manifest['version']}/metrics.jsonl").splitlines()]
    _assert_matches(rows, {name: run.series(name) for name in {k for r in run.history for k in r}})
    assert run.config["manifests_version"] == md["manifests_version"].value
    _assert_matches(rows, tensorboard_scalars(md["tensorboard_log_dir"].value))
    assert Path(md["tensorboard_log_dir"].value).is_relative_to(tmp_path / "tb")
