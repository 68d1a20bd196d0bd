"""The training loop on a tiny manifest: it learns, resumes exactly, runs under DDP (gloo), fails clearly."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm_pipeline.manifests.build import read_manifest_split
from mllm_pipeline.model import MLLM
from mllm_pipeline.train import ManifestData, TrainConfig, TrainError, loss_check, read_metrics, train
from mllm_pipeline.train.loop import manifest_info
from mllm_pipeline.train.types import DataConfig
from mllm_pipeline.manifests.tokenization import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _data(storage, tokens_per_batch=1024, rank=0, world=1, seed=0):
    tok = load_tokenizer(manifest_info(storage).tokenizer)
    image_id, video_id = tok.convert_tokens_to_ids(["<image>", "<video>"])
    cfg = DataConfig(tokens_per_batch=tokens_per_batch, seed=seed, hd_num=1, video_frames=2, video_hd_num=1,
                     image_token_id=image_id, video_token_id=video_id)
    return ManifestData(storage, read_manifest_split(storage, "train"), cfg, rank, world)


def test_batches_respect_the_budget_cover_the_epoch_and_decode_media(manifest_root):
    data = _data(manifest_root, tokens_per_batch=1024)
    plan = data.plan(0)
    assert sorted(i for b in plan for i in b) == list(range(len(data)))  # each row once per epoch
    for rows in plan:
        assert len(rows) == 1 or len(rows) * max(data.seq_len[i] for i in rows) <= 1024
    assert data.plan(0) == _data(manifest_root, 1024).plan(0)  # deterministic
    assert data.plan(1) != plan or len(plan) == 1
    batches = []
    it = data.iterate()
    for _ in range(len(plan)):
        batches.append(next(it))
    for b in batches:
        for sid, m in zip(b.ids, b.media):
            if sid.startswith("webvid"):
                assert tuple(m.shape) == (2, 3, 336, 336)  # 2 frames, each HD at video_hd_num 1
            else:
                assert m.dim() == 3 and m.shape[0] == 3 and m.shape[1] % 336 == 0 and m.shape[2] % 336 == 0
    # resuming at a position gives the same batches as reading on from the start
    again = list(zip(range(len(plan) - 1), data.iterate((0, 1))))
    assert [b.ids for _, b in again] == [b.ids for b in batches[1:]]
    assert torch.equal(again[0][1].media[0], batches[1].media[0])


def test_ranks_split_the_batches(manifest_root):
    a, b = _data(manifest_root, 400, 0, 2), _data(manifest_root, 400, 1, 2)
    plan = a.plan(0)
    ia, ib = a.iterate(), b.iterate()
    got_a = [next(ia).position[1] for _ in range(len(plan) // 2)]
    got_b = [next(ib).position[1] for _ in range(len(plan) // 2)]
    assert got_a == list(range(0, len(plan), 2)) and got_b == list(range(1, len(plan), 2))


def test_a_tiny_model_overfits_a_handful_of_samples(manifest_root, tmp_path):
    cfg = TrainConfig(stage="sft", lr=1e-2, llm_lr_scale=1.0, max_steps=24, warmup_steps=2, tokens_per_batch=4096)
    summary = train(cfg, manifest_root.root, tmp_path / "out")
    losses = [r["loss"] for r in read_metrics(tmp_path / "out")]
    assert len(losses) == 24 and summary["steps"] == 24
    assert losses[-1] < 0.5 * losses[0], losses
    assert loss_check(losses)[0]
    model = MLLM.from_pretrained(tmp_path / "out" / "model")  # the final model loads back
    assert model.config.hd_num == 1
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["train"]["stage"] == "sft"


class _Crash(Exception):
    pass


def test_resume_continues_exactly_like_an_uninterrupted_run(manifest_root, tmp_path):
    cfg = TrainConfig(lr=2e-3, max_steps=6, warmup_steps=1, tokens_per_batch=800, checkpoint_every=3, seed=3)
    train(cfg, manifest_root.root, tmp_path / "straight")
    straight = [r["loss"] for r in read_metrics(tmp_path / "straight")]

    def crash_after_step_3(rec):
        if rec["step"] == 4:  # step 3 was checkpointed; step 4 is lost with the crash
            raise _Crash()

    with pytest.raises(_Crash):
        train(cfg, manifest_root.root, tmp_path / "resumed", on_log=crash_after_step_3)
    summary = train(cfg, manifest_root.root, tmp_path / "resumed")
    assert summary["resumed_from_step"] == 3
    resumed = [r["loss"] for r in read_metrics(tmp_path / "resumed")]
    assert len(resumed) == 6
    assert resumed == pytest.approx(straight, abs=1e-6, rel=0)
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())["weights_checksum"]
    assert summary["weights_checksum"] == pytest.approx(a, abs=1e-6)


def test_clear_errors(manifest_root, tmp_path):
    with pytest.raises(TrainError, match="hd_num=4 disagrees with the manifests' hd_num=1"):
        train(TrainConfig(max_steps=1, model={"tiny": True, "hd_num": 4}), manifest_root.root, tmp_path / "a")
    with pytest.raises(TrainError, match="No committed output"):
        train(TrainConfig(max_steps=1), str(tmp_path / "empty-root"), tmp_path / "b")
    with pytest.raises(TrainError, match="preset must be one of"):
        TrainConfig.from_dict({"preset": "warmup"})
    with pytest.raises(TrainError, match="unknown training option"):
        TrainConfig.from_dict({"stepz": 3})


def test_ddp_two_ranks_on_gloo_agree(manifest_root, tmp_path):
    cfg = json.dumps({"max_steps": 3, "tokens_per_batch": 400, "lr": 2e-3, "device": "cpu"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mllm_pipeline.train", "--storage-root", manifest_root.root,
         "--output", str(tmp_path / "ddp"), "--config", cfg],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = dict(re.findall(r"rank (\d) weights_checksum ([-+0-9.eE]+)", proc.stdout))
    assert set(sums) == {"0", "1"}, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert float(sums["0"]) == pytest.approx(float(sums["1"]), rel=1e-9)
    rows = read_metrics(tmp_path / "ddp")
    assert len(rows) == 3
    from mllm_pipeline.train.loader import LOADER_COLUMNS, LoaderConfig, ShardedData

    d = _data(manifest_root, 400, 0, 2)  # the worker loader's plan for two ranks (its DataConfig, the run's packing)
    sharded = ShardedData(manifest_root, read_manifest_split(manifest_root, "train", columns=LOADER_COLUMNS),
                          dataclasses.replace(d.config, packing=True), 0, 2, loader=LoaderConfig())
    plan_batches = sharded.plan(0)
    first_two = plan_batches[0] + plan_batches[1]
    assert rows[0]["samples"] == len(first_two)  # step 1 saw one batch per rank


def test_an_empty_train_split_is_an_error(manifest_root):
    from mllm_pipeline.train.types import DataError

    table = read_manifest_split(manifest_root, "train").slice(0, 0)
    with pytest.raises(DataError, match="train split is empty"):
        ManifestData(manifest_root, table, DataConfig(image_token_id=1, video_token_id=2))


def test_fsdp2_checkpoint_from_two_ranks_resumes_on_one(manifest_root, tmp_path):
    """Two gloo ranks train with FSDP2 and write a sharded (DCP) checkpoint; one process resumes from it: the
    restored weights give the validation loss the two ranks measured at that step."""
    opts = {"max_steps": 2, "tokens_per_batch": 400, "lr": 2e-3, "device": "cpu", "fsdp": True, "val_every": 2,
            "val_batches": 2, "checkpoint_every": 2}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mllm_pipeline.train", "--storage-root", manifest_root.root, "--val-split", "train",
         "--output", str(tmp_path / "fsdp"), "--config", json.dumps(opts)],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "memory estimate per rank (fp32, FSDP2 over 2)" in proc.stdout
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    assert (ckpt / "dcp" / ".metadata").exists() and (ckpt / "rng-rank1.pt").exists()
    val_two_ranks = read_metrics(tmp_path / "fsdp")[-1]["val_loss"]
    summary = train(TrainConfig(**{**opts, "max_steps": 3}), manifest_root.root, tmp_path / "fsdp", val_split="train")
    assert summary["resumed_from_step"] == 2
    assert summary["val_loss_at_resume"] == pytest.approx(val_two_ranks, rel=1e-5)
    assert MLLM.from_pretrained(tmp_path / "fsdp" / "model").config.hd_num == 1  # the final model, gathered
