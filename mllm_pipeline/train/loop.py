"""The training loop: one optimizer step after another, with validation, checkpoints and metrics.

A reader can take the run one file at a time: ``config.py`` (the options and presets), ``setup.py`` (manifests,
model, precision, memory estimate, DDP / FSDP2), ``loader.py`` and ``data.py`` (packed batches from the shards:
DataLoader workers over each rank's own tars, the HD transform on the device), ``checkpoint.py`` (save and exact
resume), ``metrics.py`` (FLOPs, MFU, the metrics file), and this loop.

Output directory::

    <output>/
      train_config.json     the TrainConfig and the resolved MLLMConfig
      metrics.jsonl         one JSON line per optimizer step (rank 0); ``val_loss`` on validation steps
      checkpoints/step-00000010/   see checkpoint.py
      model/                the final model (loads with ``MLLM.from_pretrained``)
      official/             started from the official 4KHD checkpoint: the final model in its layout and config

A step: the ``grad_accum`` micro-batches of every rank are fetched first and their answer tokens counted across
ranks, so the loss is the mean over the answer tokens of the whole step (each micro-batch's summed token loss is
divided by that count over the world size, because DDP / FSDP average gradients over ranks). Metrics per step:
``loss``, ``lr`` (the first group), ``tokens_per_s`` / ``samples_per_s`` (all ranks, real tokens = manifest
``seq_len``), ``step_time_s``, ``grad_norm`` (the global gradient norm before clipping), on CUDA ``mfu`` (see
metrics.py) and ``max_memory_gib`` (rank 0's peak allocated memory during the step), and ``val_loss`` every
``val_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from mllm_pipeline.model import MLLM
from mllm_pipeline.model.phases import PHASES
from mllm_pipeline.storage import Storage
from mllm_pipeline.train.checkpoint import (full_state_dict, latest_checkpoint, load_checkpoint, read_state,
                                            save_checkpoint, save_final)
from mllm_pipeline.train.config import PRESETS, TrainConfig, TrainError, lr_lambda
from mllm_pipeline.train.data import ManifestData, batch_to_device
from mllm_pipeline.train.loader import LOADER_COLUMNS, LoaderConfig, ShardedData
from mllm_pipeline.train.dist import Dist, all_mean, all_sum, seed_all, setup_distributed
from mllm_pipeline.train.metrics import (PEAK_BF16_TFLOPS, batch_flops, loss_check, peak_flops, read_metrics,
                                         summarize, truncate_metrics)
from mllm_pipeline.train.setup import (ManifestInfo, apply_precision, build, format_memory, manifest_info,
                                       memory_estimate, model_config, wrap)
from mllm_pipeline.train.types import Batch, DataConfig, DataError

__all__ = ["PEAK_BF16_TFLOPS", "PRESETS", "ManifestInfo", "TrainConfig", "TrainError", "latest_checkpoint",
           "loss_check", "manifest_info", "model_config", "peak_flops", "read_metrics", "summarize", "train"]


def answer_tokens(batch: Batch) -> int:
    """Next-token targets of a batch: label-mask positions after each sample's first token."""
    return int(sum(int(m[1:].sum()) for m in batch.label_mask))


def _data(storage: Storage, split: str, info: ManifestInfo, cfg: TrainConfig, model: MLLM, dist: Dist,
          prefix: str, validation: bool = False) -> ManifestData | ShardedData:
    """The split's loader: ``ShardedData`` (``loader="workers"``; for validation in this process over every shard,
    the same batches on any world size) or the thread loader ``ManifestData``."""
    from mllm_pipeline.manifests.build import read_manifest_split

    mcfg = model.config
    workers = cfg.loader == "workers"
    try:
        table = read_manifest_split(storage, split, prefix, info.version, columns=LOADER_COLUMNS if workers else None)
    except FileNotFoundError:
        raise TrainError(f"{info.location}/{split}.parquet not found: the manifests hold no {split} split") from None
    data_cfg = DataConfig(tokens_per_batch=cfg.tokens_per_batch, buffer_rows=cfg.buffer_rows, seed=cfg.seed,
                          hd_num=mcfg.hd_num, video_frames=mcfg.video_frames, video_hd_num=mcfg.video_hd_num,
                          image_token_id=mcfg.image_token_id, video_token_id=mcfg.video_token_id,
                          prefetch=cfg.prefetch, packing=cfg.packing, hd_num_by_dataset=dict(cfg.hd_num_by_dataset))
    source = f"{info.location}/{split}.parquet"
    try:
        if workers:
            lc = LoaderConfig(num_workers=0 if validation else cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                              pin_memory=cfg.pin_memory, partition=not validation,
                              hd_on_device=dist.device.type == "cuda")
            data: ManifestData | ShardedData = ShardedData(storage, table, data_cfg, dist.rank, dist.world_size,
                                                           source=source, loader=lc)
        else:
            data = ManifestData(storage, table, data_cfg, dist.rank, dist.world_size, source=source)
        data.plan(0)
    except DataError as e:
        raise TrainError(str(e)) from None
    return data


@torch.no_grad()
def validate(wrapped: torch.nn.Module, data: ManifestData | ShardedData, n_batches: int, dist: Dist, autocast) -> float:
    """Mean loss over the answer tokens of the first ``n_batches`` global batches of the split's first epoch
    (the same batches on any world size)."""
    wrapped.eval()
    total, tokens = 0.0, 0
    n = min(n_batches, data.batches_per_epoch())
    n -= n % dist.world_size  # FSDP2's forward is collective: every rank runs as many batches (plans are cut so)
    it = data.iterate((0, 0))
    for b in range(dist.rank, n, dist.world_size):
        batch = next(it)
        assert batch.position == (0, b), (batch.position, b)
        with autocast:
            out = wrapped(**batch_to_device(batch, dist.device))
        total += float(out.loss_sum)
        tokens += out.label_tokens
    wrapped.train()
    total, tokens = all_sum([total, float(tokens)], dist)
    return total / max(tokens, 1.0)


def train(cfg: TrainConfig, storage_root: str | None, output: str | os.PathLike, manifests_prefix: str = "manifests",
          resume: bool = True, on_log: Callable[[dict[str, Any]], None] | None = None,
          dist: Dist | None = None, manifests_version: str | None = None, val_split: str = "val",
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on the manifests' train split (the current version, or ``manifests_version``); returns a summary (also
    written to ``<output>/summary.json``)."""
    from mllm_pipeline.manifests.tokenization import load_tokenizer

    dist = dist or setup_distributed(cfg.device)
    log = log or (lambda msg: print(msg, flush=True) if dist.main else None)
    output = Path(output)
    storage = Storage(storage_root)
    info = manifest_info(storage, manifests_prefix, manifests_version)
    try:
        tokenizer = load_tokenizer(info.tokenizer)
    except ValueError as e:
        raise TrainError(str(e)) from None

    seed_all(cfg.seed)
    model = build(cfg, info, tokenizer)
    mcfg = model.config
    data = _data(storage, "train", info, cfg, model, dist, manifests_prefix)
    val = _data(storage, val_split, info, cfg, model, dist, manifests_prefix, validation=True) if cfg.val_every else None
    kw = {"llm_lr_scale": cfg.llm_lr_scale} if cfg.stage == "sft" else {}
    groups = PHASES[cfg.stage](model, lr=cfg.lr, vision_lr_scale=cfg.vision_lr_scale,
                               vision_layer_decay=cfg.vision_layer_decay, **kw)
    for g in groups:
        g["weight_decay"] = cfg.weight_decay
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    precision = cfg.resolved_precision(dist.device.type)
    apply_precision(model, precision)
    memory = memory_estimate(model, cfg, dist, precision)
    log(format_memory(memory, precision, dist.world_size, cfg.fsdp))

    ckpt = latest_checkpoint(output) if resume else None
    if not resume and dist.main and (output / "checkpoints").exists():
        shutil.rmtree(output / "checkpoints")
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0}
    if ckpt is not None:
        state = read_state(ckpt, cfg)
    model.to(dist.device)
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]
    wrapped = wrap(model, cfg, dist, precision)
    params = dict(model.named_parameters())  # FSDP2 replaces each parameter by a sharded one: regroup by name
    for g, ns in zip(groups, group_names):
        g["params"] = [params[n] for n in ns]
    opt_kw: dict[str, Any] = {"betas": cfg.betas}
    if dist.device.type == "cuda":
        opt_kw["fused"] = True
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, **opt_kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if ckpt is not None:
        load_checkpoint(ckpt, state, model, optimizer, scheduler, cfg, dist)

    metrics_path = output / "metrics.jsonl"
    if dist.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.json").write_text(json.dumps(
            {"train": cfg.to_dict(), "model": mcfg.to_dict(), "manifests": dataclasses.asdict(info),
             "world_size": dist.world_size, "precision": precision, "memory_estimate_gib": memory,
             "fingerprint": cfg.fingerprint()}, indent=2, default=str))
        truncate_metrics(metrics_path, state["step"])

    start_step = int(state["step"])
    it = data.iterate((int(state["epoch"]), int(state["batch"])))
    peak = peak_flops(dist.device, cfg.peak_tflops)
    autocast = (torch.autocast(dist.device.type, dtype=torch.bfloat16) if precision in ("mixed", "bf16")
                else nullcontext())
    resume_val = None
    if ckpt is not None and val is not None:  # the restored weights, checked on the val batches
        resume_val = validate(wrapped, val, cfg.val_batches, dist, autocast)
        log(f"resumed at step {start_step}: val_loss {resume_val:.6f}")
    flops_cache: dict = {}
    position = (int(state["epoch"]), int(state["batch"]))
    totals = {"samples": 0, "tokens": 0, "time": 0.0}
    last: dict[str, Any] = {}
    wrapped.train()
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        micro = [next(it) for _ in range(cfg.grad_accum)]
        position = (micro[-1].position[0], micro[-1].position[1] + dist.world_size)
        step_tokens = all_sum([float(sum(answer_tokens(b) for b in micro))], dist)[0]
        # DDP / FSDP average gradients over ranks: scale the summed token losses back to the global mean
        norm = max(step_tokens, 1.0) / dist.world_size
        loss_sum, tokens, samples, flops = 0.0, 0, 0, 0.0
        for k, batch in enumerate(micro):
            sync = k == cfg.grad_accum - 1 or dist.world_size == 1 or cfg.fsdp
            ctx = nullcontext() if sync else wrapped.no_sync()  # type: ignore[operator]
            with ctx:
                inputs = batch_to_device(batch, dist.device)
                with autocast:
                    out = wrapped(**inputs, loss_normalizer=norm)
                out.loss.backward()
            loss_sum += float(out.loss_sum.detach())
            tokens += batch.tokens
            samples += batch.samples
            if peak:
                flops += batch_flops(model, batch, flops_cache, media=inputs["media"])
        trained = [p for g in groups for p in g["params"]]
        if cfg.max_grad_norm > 0:  # the norm before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trained if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        dt = time.perf_counter() - t0
        loss_all, tokens_all, samples_all, flops_all = all_sum([loss_sum, tokens, samples, flops], dist)
        dt = max(all_mean(dt, dist), 1e-9)
        totals["samples"] += int(samples_all)
        totals["tokens"] += int(tokens_all)
        totals["time"] += dt
        rec: dict[str, Any] = {"step": step + 1, "loss": loss_all / max(step_tokens, 1.0), "lr": lr,
                               "tokens": int(tokens_all), "samples": int(samples_all), "step_time_s": dt,
                               "tokens_per_s": tokens_all / dt, "samples_per_s": samples_all / dt,
                               "epoch": position[0], "batch": position[1]}
        if math.isfinite(float(grad_norm)):
            rec["grad_norm"] = float(grad_norm)
        if peak:
            rec["mfu"] = flops_all / (dt * peak * dist.world_size)
        if dist.device.type == "cuda":  # this rank's peak during the step
            rec["max_memory_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
        done = step + 1 == cfg.max_steps
        if val is not None and ((step + 1) % cfg.val_every == 0 or done):
            rec["val_loss"] = validate(wrapped, val, cfg.val_batches, dist, autocast)
        last = rec
        if dist.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if on_log and ((step + 1) % cfg.log_every == 0 or done):
                on_log(rec)
        if done or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            save_checkpoint(output, step + 1, model, optimizer, scheduler, position, cfg, dist)

    it.close()  # stops the loader's workers
    final = full_state_dict(model, cfg, dist)
    if dist.main and final is not None:
        save_final(model, final, tokenizer, output)
    summary = summarize(output) if dist.main else {}
    # a cheap fingerprint of the trained weights (ranks of a DDP run must agree; under FSDP2, of the gathered weights)
    if final is not None:
        checksum = float(sum(v.double().sum() for k, v in final.items()
                             if k in {n for n, p in model.named_parameters() if p.requires_grad}))
    else:
        checksum = float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad)) \
            if not cfg.fsdp else float("nan")
    if dist.main:
        summary["weights_checksum"] = checksum
        summary.update(resumed_from_step=start_step, precision=precision, memory_estimate_gib=memory,
                       this_run={**totals, "tokens_per_s": totals["tokens"] / max(totals["time"], 1e-9)})
        if resume_val is not None:
            summary["val_loss_at_resume"] = resume_val
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    if dist.world_size > 1:
        torch.distributed.barrier()
    return summary if dist.main else {"last": last, "weights_checksum": checksum}
