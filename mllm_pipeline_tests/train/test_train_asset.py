"""The train_mllm asset: a real Pipes subprocess on a tiny manifest; metadata, check, committed output, resume."""

from __future__ import annotations

import json

import dagster as dg

from mllm_pipeline.defs.resources import StorageResource
from mllm_pipeline.defs.train import PREFIX, train_mllm

SFT = {"lr": 1e-2, "stage": "sft", "tokens_per_batch": 4096, "checkpoint_every": 5,
       "options": json.dumps({"llm_lr_scale": 1.0})}


def _run(storage, **config):
    return dg.materialize([train_mllm], resources={"storage": StorageResource(root=storage.root)},
                          run_config={"ops": {"train_mllm": {"config": config}}}, raise_on_error=False)


def test_train_asset_through_pipes(manifest_root):
    result = _run(manifest_root, steps=12, **SFT)
    assert result.success
    md = result.asset_materializations_for_node("train_mllm")[0].metadata
    assert md["steps"].value == 12 and md["samples"].value > 0
    assert "data:image/png;base64," in md["loss_curve"].value
    assert md["tokens_per_s"].value > 0 and md["final_loss"].value < md["first_loss"].value
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("loss_decreasing", True)]
    manifest = manifest_root.read_manifest(PREFIX)
    assert manifest_root.exists(f"{PREFIX}/{manifest['version']}/model/mllm_config.json")
    assert len(manifest_root.read_bytes(f"{PREFIX}/{manifest['version']}/metrics.jsonl").splitlines()) == 12
    # same configuration, more steps: continues from the newest checkpoint (step 12) instead of starting over
    again = _run(manifest_root, steps=14, **SFT)
    assert again.success
    md2 = again.asset_materializations_for_node("train_mllm")[0].metadata
    assert md2["resumed_from_step"].value == 12 and md2["steps"].value == 14


def test_hd_num_mismatch_fails_before_launching(manifest_root):
    result = _run(manifest_root, steps=2, model_options=json.dumps({"hd_num": 9}))
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "hd_num=9 disagrees with the manifests' hd_num=1" in failure.message
