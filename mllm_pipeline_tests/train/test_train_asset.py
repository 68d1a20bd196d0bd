"""The train_mllm asset: a real Pipes subprocess on a tiny manifest; metadata, check, committed output, resume."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mllm_pipeline.defs.resources import StorageResource, TrackingResource
from mllm_pipeline.defs.train import train_mllm
from mllm_pipeline.stages.checkpoints import PREFIX

SFT = {"lr": 1e-2, "stage": "sft", "tokens_per_batch": 4096, "checkpoint_every": 5,
       "options": {"llm_lr_scale": 1.0}}


def _run(storage, **config):
    config = {"tiny": True, **config}
    return dg.materialize([train_mllm], resources={"storage": StorageResource(root=storage.root), "tracking": TrackingResource()},
                          run_config={"ops": {"train_mllm": {"config": config}}}, raise_on_error=False)


def test_train_asset_through_pipes(manifest_root):
    result = _run(manifest_root, max_steps=12, **SFT)
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
    again = _run(manifest_root, max_steps=14, **SFT)
    assert again.success
    md2 = again.asset_materializations_for_node("train_mllm")[0].metadata
    assert md2["resumed_from_step"].value == 12 and md2["steps"].value == 14


def test_hd_num_mismatch_fails_before_launching(manifest_root):
    result = _run(manifest_root, max_steps=2, model_options={"hd_num": 9})
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "hd_num=9 disagrees with the manifests' hd_num=1" in failure.message


def test_no_model_configured_is_a_config_error_naming_the_fields(manifest_root):
    """A production run never falls back to a toy model: with no model given, the asset fails before launching and
    says which fields to set."""
    before = manifest_root.current(PREFIX)
    result = dg.materialize([train_mllm], resources={"storage": StorageResource(root=manifest_root.root), "tracking": TrackingResource()},
                            run_config={"ops": {"train_mllm": {"config": {"max_steps": 2}}}}, raise_on_error=False)
    assert not result.success
    message = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "no model configured" in message and "'vision' and 'llm'" in message and "'init_from'" in message
    assert manifest_root.current(PREFIX) == before  # nothing trained, nothing committed


def test_a_run_started_before_a_refetch_new_manifests_and_retention_still_completes(tmp_path):
    """While a training run is in flight: its media shard is fetched again (a new version), new manifests are
    committed, and retention runs with the tightest rule. The run keeps reading exactly what it started on, and
    finishes; afterwards its checkpoint keeps the manifests it was trained on."""
    import threading
    import time

    from mllm_pipeline.download.images import ImageOptions, fetch_images
    from mllm_pipeline.stages.media import materialize_shard
    from mllm_pipeline.stages.lineage import apply_retention, plan_retention
    from mllm_pipeline.manifests import read_manifest_split
    from mllm_pipeline_tests.train.conftest import build_manifest

    storage = build_manifest(tmp_path, video=False)
    started_on = storage.read_manifest("manifests")["version"]
    old_tars = set(read_manifest_split(storage, "train")["media_tar"].to_pylist())
    results = []
    thread = threading.Thread(target=lambda: results.append(_run(storage, max_steps=20, **SFT)))
    thread.start()
    deadline = time.monotonic() + 120
    while not storage.listdir("_pins"):  # the run pins the manifests it trains on before it launches
        assert thread.is_alive() and time.monotonic() < deadline, "the training run never started"
        time.sleep(0.1)

    raw_uri = storage.read_manifest("media/coco/shard-00000")["raw_uri"]
    opts = ImageOptions(processes=1, threads=1)
    refetch = materialize_shard(storage, dataset="coco", shard_key="shard-00000", shard_index=0, raw_uri=raw_uri,
                                raw_version="v1", options=opts.content_options(), force=True,
                                fetch=lambda rows, log: fetch_images(rows, log, opts))
    assert f"{refetch.manifest['prefix']}/{refetch.manifest['version']}/media.tar" not in old_tars
    with storage.new_version("manifests", {"n": "newer"}, inputs=[
            {"prefix": refetch.manifest["prefix"], "version": refetch.manifest["version"]}]) as v:
        v.commit({"kind": "manifests", "summary": {}})
    plan = plan_retention(storage, keep_last=1, min_age_hours=0)
    apply_retention(storage, plan)
    assert all(storage.exists(t) for t in old_tars), "retention removed media a running job reads"

    thread.join(timeout=600)
    assert results and results[0].success
    md = results[0].asset_materializations_for_node("train_mllm")[0].metadata
    assert md["steps"].value == 20 and md["manifests_version"].value == started_on
    # the run is over: its pin is gone, and nothing kept reads what it trained on but its checkpoint
    assert storage.listdir("_pins") == []
    gone = {(r["prefix"], r["version"]) for r in plan_retention(storage, keep_last=1, min_age_hours=0).remove}
    assert ("manifests", started_on) not in gone  # the current checkpoint was trained on it


def test_a_missing_model_stops_before_any_process_starts(manifest_root, tmp_path):
    """A vision tower that is not on disk and an LLM that is not in the local Hugging Face cache: one message naming
    the field and the fix, and no training process launched (no run directory, nothing committed)."""
    before = manifest_root.current(PREFIX)
    tree = sorted(Path(manifest_root.root).rglob("*"))
    result = _run(manifest_root, max_steps=2, vision=str(tmp_path / "no-such-clip"), llm="some-org/not-downloaded-llm")
    assert not result.success
    message = result.get_step_failure_events()[0].step_failure_data.error.message
    assert f"vision '{tmp_path / 'no-such-clip'}' does not exist" in message
    result = _run(manifest_root, max_steps=2, vision=str(tmp_path), llm="some-org/not-downloaded-llm")
    message = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "has no config.json" in message
    (tmp_path / "config.json").write_text("{}")
    result = _run(manifest_root, max_steps=2, vision=str(tmp_path), llm="some-org/not-downloaded-llm")
    message = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "llm 'some-org/not-downloaded-llm' is neither a local directory nor a model in the local Hugging Face cache" in message
    assert "huggingface-cli download some-org/not-downloaded-llm" in message
    assert manifest_root.current(PREFIX) == before
    assert sorted(Path(manifest_root.root).rglob("*")) == tree  # no run directory: nothing was launched


def test_every_training_option_is_a_typed_field_with_the_clis_name():
    """Each TrainConfig field (what the CLI's --config takes) is settable from the asset under the same name, as a
    YAML field (top level or under options), and nothing else is."""
    import dataclasses

    from mllm_pipeline.defs.train import TOP_LEVEL, TrainAssetConfig, TrainOptions
    from mllm_pipeline.train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    assert set(TOP_LEVEL) | set(TrainOptions.model_fields) == fields
    assert not set(TOP_LEVEL) & set(TrainOptions.model_fields)
    assert set(TOP_LEVEL) <= set(TrainAssetConfig.model_fields)
    cfg = TrainAssetConfig(tiny=True, max_steps=7, options=TrainOptions(packing=False, hd_num_by_dataset={"coco": 9},
                                                                        betas=[0.9, 0.99], val_every=3))
    tc = TrainConfig.from_dict(cfg.train_config())
    assert (tc.max_steps, tc.packing, tc.hd_num_by_dataset, tc.betas, tc.val_every) == (7, False, {"coco": 9}, (0.9, 0.99), 3)
