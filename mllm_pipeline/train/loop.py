"""The training loop: AdamW + warmup/cosine, gradient accumulation, bf16 autocast, DDP / FSDP, exact resume.

Output directory::

    <output>/
      train_config.json     the TrainConfig and the resolved MLLMConfig
      metrics.jsonl         one JSON line per optimizer step (rank 0)
      checkpoints/step-00000010/
        model.safetensors | trainable.safetensors   weights (see below)
        optimizer.pt, scheduler.pt, state.json (step, data position), rng.pt (torch / numpy / python RNGs)
      model/                the final model (``MLLM.save_pretrained``; loads with ``MLLM.from_pretrained``)

A checkpoint holds the trainable parameters (``trainable.safetensors``) when both base models are named (hub name
or path: the frozen weights are reloaded from there); a model built from configs alone (random base, tests and
the demo) is saved whole (``model.safetensors``). Resuming restores the weights, the optimizer and scheduler, the
data position and every RNG, so a resumed run takes exactly the steps of an uninterrupted one (the tests check
equal losses). Only rank 0 writes; a checkpoint directory is written under a temporary name and renamed.

Metrics per step: ``loss`` (mean over the micro-batches and ranks), ``lr`` (the base group), ``tokens_per_s`` /
``samples_per_s`` (all ranks, real tokens = manifest ``seq_len``, padding not counted), ``step_time_s`` and, on
CUDA, ``mfu``: model FLOPs of the step (``flops_per_sample`` of every sample: ViT crops, projector, LLM, adapter,
the 6N + attention convention; frozen weights counted as if trained, the usual MFU convention) divided by
``world_size * peak`` and the step time. Peak dense bf16 tensor-core FLOP/s per GPU (:data:`PEAK_BF16_TFLOPS`,
vendor datasheets, no sparsity): H100 SXM / H200 989.4, H100 PCIe 756, H100 NVL 835, A100 312, L40S 362.05,
A10G 125 (A10: 125), L4 121. Unknown cards: set ``peak_tflops``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_pipeline.model import MLLM, MLLMConfig, build_model, tiny_config
from mllm_pipeline.model.flops import count_media, flops_per_sample
from mllm_pipeline.model.stages import STAGES
from mllm_pipeline.storage import Storage
from mllm_pipeline.train.data import DataConfig, DataError, ManifestData, batch_to_device

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.05, "A10G": 125.0, "A10": 125.0, "L4": 121.0}


class TrainError(ValueError):
    """A configuration or input problem, reported without a traceback by the CLI."""


@dataclasses.dataclass
class TrainConfig:
    stage: str = "pretrain"  # pretrain | sft (mllm_pipeline.model.stages)
    lr: float = 2e-4
    llm_lr_scale: float = 0.1  # sft: the base LLM's lr = lr * llm_lr_scale
    vision_lr_scale: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0  # 0 disables clipping
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    max_steps: int = 30
    tokens_per_batch: int = 8192  # padded tokens per micro-batch per rank
    buffer_rows: int = 512
    grad_accum: int = 1
    grad_checkpointing: bool = False
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on the CPU)
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # newest N kept (0: all)
    log_every: int = 1
    # FullyShardedDataParallel (use_orig_params, default FULL_SHARD) instead of DDP when world_size > 1, for LLMs
    # whose weights + optimizer state do not fit one GPU. CUDA only. Checkpoints then hold the full weights
    # (gathered on rank 0) and one optimizer shard per rank (resume with the same world size).
    fsdp: bool = False
    device: str = ""  # "" = cuda when available, else cpu
    peak_tflops: float = 0.0  # per-GPU peak for MFU; 0 = from PEAK_BF16_TFLOPS
    prefetch: int = 2
    # the model: {"tiny": true, ...tiny_config overrides} or MLLMConfig fields (vision, llm, hd_num, adapter ...)
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"tiny": True})

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TrainError(f"stage must be one of {sorted(STAGES)}, got {self.stage!r}")
        for name in ("max_steps", "tokens_per_batch", "grad_accum", "log_every", "buffer_rows"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise TrainError(f"lr must be positive, got {self.lr}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Identity of a run for resuming: everything but max_steps / checkpointing / logging / device choices."""
        skip = {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "device", "peak_tflops", "prefetch"}
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "") -> Dist:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): nccl on CUDA, gloo on the CPU."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(want)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def _all_mean(x: float, dist: Dist) -> float:
    if dist.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / dist.world_size


def _all_sum(values: list[float], dist: Dist) -> list[float]:
    if dist.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------------------
# model and inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ManifestInfo:
    version: str
    hd_num: int
    video_frames: int
    video_hd_num: int
    tokenizer: str  # local directory or hub name
    location: str


def manifest_info(storage: Storage, prefix: str = "manifests", version: str | None = None) -> ManifestInfo:
    """The current manifests (or the committed ``version``: a run trains on exactly the version it was started on,
    whatever is committed after)."""
    try:
        m = storage.read_manifest(prefix)
    except FileNotFoundError as e:
        raise TrainError(f"{e} (the manifests asset writes it)") from None
    if version is not None and m["version"] != version:
        m = storage.committed_version(prefix, version)
        if m is None:
            raise TrainError(f"no committed manifests version {version} under {storage.uri(prefix)}")
    cfg = m.get("summary", {}).get("config", {})
    version = m["version"]
    tok = cfg.get("tokenizer") or ""
    if not tok:
        rel = f"{prefix}/{version}/tokenizer"
        if not storage.exists(f"{rel}/tokenizer.json"):
            raise TrainError(f"the manifests at {storage.uri(f'{prefix}/{version}')} name no tokenizer and hold no "
                             "tokenizer/ directory")
        if storage.local:
            tok = storage.uri(rel)
        else:  # fetch the small demo tokenizer to a local temp dir
            import tempfile

            tok = tempfile.mkdtemp(prefix="mllm-tokenizer-")
            for name in storage.listdir(rel):
                Path(tok, name).write_bytes(storage.read_bytes(f"{rel}/{name}"))
    return ManifestInfo(version, int(cfg.get("hd_num", 9)), int(cfg.get("video_frames", 8)),
                        int(cfg.get("video_hd_num", 1)), tok, storage.uri(f"{prefix}/{version}"))


def model_config(cfg: TrainConfig, info: ManifestInfo, tokenizer: Any) -> MLLMConfig:
    """The MLLMConfig for this run: media settings from the manifests, placeholder ids from the tokenizer."""
    spec = dict(cfg.model)
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    for name, have in (("hd_num", info.hd_num), ("video_frames", info.video_frames), ("video_hd_num", info.video_hd_num)):
        if name in spec and int(spec[name]) != have:
            raise TrainError(f"model config {name}={spec[name]} disagrees with the manifests' {name}={have} (their "
                             f"media-token counts were computed for it): rebuild the manifests or drop {name}")
        spec[name] = have
    spec.update(image_token_id=image_id, video_token_id=video_id)
    tiny = spec.pop("tiny", False)
    try:
        if tiny:
            vocab = int(math.ceil(len(tokenizer) / 64) * 64)
            spec.setdefault("vocab_size", vocab)
            return tiny_config(**spec)
        return MLLMConfig.from_dict(spec)
    except (TypeError, ValueError) as e:
        raise TrainError(f"bad model config {cfg.model}: {e}") from None


def _fit_vocab(model: MLLM, tokenizer: Any) -> None:
    emb = model.llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > emb:  # the placeholders were added to the tokenizer: grow the embedding table
        model.llm.resize_token_embeddings(len(tokenizer))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    s: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at ``max_steps``."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():  # ordered: the specific names first
        if key in name:
            return tf * 1e12
    return None


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").exists())
    return done[-1] if done else None


def _full_weights(model: MLLM) -> bool:
    return model.config.vision is None or model.config.llm is None


def _unwrap(model: torch.nn.Module) -> MLLM:
    return getattr(model, "module", model)  # type: ignore[return-value]


def _model_state(wrapped: torch.nn.Module, cfg: TrainConfig, dist: Dist) -> dict[str, torch.Tensor] | None:
    """Tensors to save (rank 0; None elsewhere): all weights or the trainable ones."""
    model = _unwrap(wrapped)
    if cfg.fsdp and dist.world_size > 1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            full = wrapped.state_dict()
        if not dist.main:
            return None
        if not _full_weights(model):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            full = {k: v for k, v in full.items() if k in trainable}
        return {k: v.detach().contiguous().cpu() for k, v in full.items()}
    if not dist.main:
        return None
    if _full_weights(model):
        return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output: Path, step: int, wrapped: torch.nn.Module, optimizer, scheduler,
                    position: tuple[int, int], cfg: TrainConfig, dist: Dist) -> Path | None:
    from safetensors.torch import save_file

    state = _model_state(wrapped, cfg, dist)
    sharded_optim = cfg.fsdp and dist.world_size > 1
    final = _step_dir(output, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.world_size > 1:
        torch.distributed.barrier()
    if sharded_optim:  # every rank keeps its own shard of the optimizer state
        torch.save(optimizer.state_dict(), tmp / f"optimizer-rank{dist.rank}.pt")
    if dist.world_size > 1:
        torch.distributed.barrier()
    if not dist.main:
        return None
    name = "model.safetensors" if _full_weights(_unwrap(wrapped)) else "trainable.safetensors"
    shared = {}
    # tied weights (shared storage) cannot be saved twice by safetensors: clone
    for k, v in (state or {}).items():
        shared[k] = v.clone() if any(v.data_ptr() == o.data_ptr() for o in shared.values()) else v
    save_file(shared, str(tmp / name), metadata={"format": "pt"})
    if not sharded_optim:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "epoch": position[0], "batch": position[1],
                                                "world_size": dist.world_size, "fingerprint": cfg.fingerprint()}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if cfg.keep_checkpoints:
        done = sorted(p for p in final.parent.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp"))
        for old in done[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model: MLLM, ckpt: Path) -> None:
    """Load a checkpoint's weights into the (unwrapped) model."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "trainable.safetensors"):
        if (ckpt / name).exists():
            state = load_file(str(ckpt / name))
            result = model.load_state_dict(state, strict=name == "model.safetensors")
            if getattr(result, "unexpected_keys", None):
                raise TrainError(f"{ckpt / name}: weights the model does not have: {result.unexpected_keys[:5]}")
            return
    raise TrainError(f"{ckpt}: no model.safetensors or trainable.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------


def _flops(model: MLLM, batch, cache: dict) -> float:
    total = 0.0
    for seq, m in zip(batch.input_ids, batch.media):
        items = [] if m is None else [m]
        crops, img = count_media(model, items)
        key = (int(seq.numel()) - len(items) + img, crops, img)
        if key not in cache:
            cache[key] = flops_per_sample(model, key[0], crops, img)["total"]
        total += cache[key]
    return total


def train(cfg: TrainConfig, storage_root: str | None, output: str | os.PathLike, manifests_prefix: str = "manifests",
          resume: bool = True, on_log: Callable[[dict[str, Any]], None] | None = None,
          dist: Dist | None = None, manifests_version: str | None = None) -> dict[str, Any]:
    """Train on the manifests' train split (the current version, or ``manifests_version``); returns a summary (also
    written to ``<output>/summary.json``)."""
    from mllm_pipeline.manifests.build import read_manifest_split
    from mllm_pipeline.manifests.tokenization import load_tokenizer

    dist = dist or setup_distributed(cfg.device)
    if cfg.fsdp and dist.device.type != "cuda":
        raise TrainError("fsdp needs CUDA devices (torch's FullyShardedDataParallel has no CPU backend); "
                         "use DDP (fsdp false) on the CPU")
    output = Path(output)
    storage = Storage(storage_root)
    info = manifest_info(storage, manifests_prefix, manifests_version)
    try:
        tokenizer = load_tokenizer(info.tokenizer)
    except ValueError as e:
        raise TrainError(str(e)) from None
    mcfg = model_config(cfg, info, tokenizer)
    if cfg.grad_checkpointing:
        mcfg = mcfg.replace(gradient_checkpointing=True)

    try:
        table = read_manifest_split(storage, "train", manifests_prefix, info.version)
    except FileNotFoundError:
        raise TrainError(f"{info.location}/train.parquet not found: the manifests hold no train split") from None
    data_cfg = DataConfig(tokens_per_batch=cfg.tokens_per_batch, buffer_rows=cfg.buffer_rows, seed=cfg.seed,
                          hd_num=mcfg.hd_num, video_frames=mcfg.video_frames, video_hd_num=mcfg.video_hd_num,
                          image_token_id=mcfg.image_token_id, video_token_id=mcfg.video_token_id, prefetch=cfg.prefetch)
    try:
        data = ManifestData(storage, table, data_cfg, dist.rank, dist.world_size, source=f"{info.location}/train.parquet")
        data.plan(0)
    except DataError as e:
        raise TrainError(str(e)) from None

    seed_all(cfg.seed)
    model = build_model(mcfg)
    _fit_vocab(model, tokenizer)
    kw = {"llm_lr_scale": cfg.llm_lr_scale} if cfg.stage == "sft" else {}
    groups = STAGES[cfg.stage](model, lr=cfg.lr, vision_lr_scale=cfg.vision_lr_scale, **kw)
    for g in groups:
        g["weight_decay"] = cfg.weight_decay
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    ckpt = latest_checkpoint(output) if resume else None
    if not resume and dist.main and (output / "checkpoints").exists():
        shutil.rmtree(output / "checkpoints")
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0}
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("fingerprint") not in (None, cfg.fingerprint()):
            raise TrainError(f"{ckpt} was written by a run with a different configuration; use another output "
                             "directory or resume=false")
        if state.get("world_size", 1) != dist.world_size:
            raise TrainError(f"{ckpt} was written with {state.get('world_size')} rank(s), this run has "
                             f"{dist.world_size}: the data order would differ; resume with the same world size")
        load_weights(model, ckpt)
    model.to(dist.device)

    wrapped: torch.nn.Module = model
    if dist.world_size > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            wrapped = FSDP(model, use_orig_params=True, device_id=dist.device if dist.device.type == "cuda" else None)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                          find_unused_parameters=True)
    # AdamW over the groups; the fused kernel on CUDA
    opt_kw: dict[str, Any] = {"betas": cfg.betas}
    if dist.device.type == "cuda":
        opt_kw["fused"] = True
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, **opt_kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if ckpt is not None:
        optim_file = ckpt / (f"optimizer-rank{dist.rank}.pt" if cfg.fsdp and dist.world_size > 1 else "optimizer.pt")
        optimizer.load_state_dict(torch.load(optim_file, map_location=dist.device, weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))

    metrics_path = output / "metrics.jsonl"
    if dist.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.json").write_text(json.dumps(
            {"train": cfg.to_dict(), "model": mcfg.to_dict(), "manifests": dataclasses.asdict(info),
             "world_size": dist.world_size, "fingerprint": cfg.fingerprint()}, indent=2, default=str))
        _truncate_metrics(metrics_path, state["step"])

    start_step = int(state["step"])
    it = data.iterate((int(state["epoch"]), int(state["batch"])))
    peak = peak_flops(dist.device, cfg.peak_tflops)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and dist.device.type == "cuda"
                else nullcontext())
    flops_cache: dict = {}
    position = (int(state["epoch"]), int(state["batch"]))
    totals = {"samples": 0, "tokens": 0, "time": 0.0}
    last: dict[str, Any] = {}
    wrapped.train()
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        loss_sum, tokens, samples, flops = 0.0, 0, 0, 0.0
        for micro in range(cfg.grad_accum):
            batch = next(it)
            position = (batch.position[0], batch.position[1] + dist.world_size)
            kwargs = batch_to_device(batch, dist.device)
            sync = micro == cfg.grad_accum - 1 or dist.world_size == 1 or cfg.fsdp
            ctx = nullcontext() if sync else wrapped.no_sync()  # type: ignore[operator]
            with ctx:
                with autocast:
                    out = wrapped(**kwargs)
                loss = out.loss / cfg.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
            tokens += batch.tokens
            samples += batch.samples
            if peak:
                flops += _flops(model, batch, flops_cache)
        if cfg.max_grad_norm > 0:
            if cfg.fsdp and dist.world_size > 1:
                wrapped.clip_grad_norm_(cfg.max_grad_norm)  # type: ignore[operator]
            else:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        dt = time.perf_counter() - t0
        loss_mean = _all_mean(loss_sum, dist)
        tokens_all, samples_all, flops_all = _all_sum([tokens, samples, flops], dist)
        dt = max(_all_sum([dt], dist)[0] / dist.world_size, 1e-9)
        totals["samples"] += int(samples_all)
        totals["tokens"] += int(tokens_all)
        totals["time"] += dt
        rec: dict[str, Any] = {"step": step + 1, "loss": loss_mean, "lr": lr, "tokens": int(tokens_all),
                               "samples": int(samples_all), "step_time_s": dt, "tokens_per_s": tokens_all / dt,
                               "samples_per_s": samples_all / dt, "epoch": position[0], "batch": position[1]}
        if peak:
            rec["mfu"] = flops_all / (dt * peak * dist.world_size)
        last = rec
        if dist.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if on_log and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps):
                on_log(rec)
        done = step + 1 == cfg.max_steps
        if done or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            save_checkpoint(output, step + 1, wrapped, optimizer, scheduler, position, cfg, dist)

    # final model
    if cfg.fsdp and dist.world_size > 1:
        state_dict = _model_state(wrapped, cfg, dist)
        if dist.main and state_dict is not None:
            model.load_state_dict(state_dict, strict=False)
    if dist.main:
        tmp = output / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, trainable_only=not _full_weights(model))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        shutil.rmtree(output / "model", ignore_errors=True)
        os.replace(tmp, output / "model")
    summary = summarize(output) if dist.main else {}
    # a cheap fingerprint of the trained weights (ranks of a DDP run must agree; not meaningful under FSDP)
    checksum = float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))
    if dist.main:
        summary["weights_checksum"] = checksum
        summary.update(resumed_from_step=start_step, this_run={**totals, "tokens_per_s": totals["tokens"] / max(totals["time"], 1e-9)})
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    if dist.world_size > 1:
        torch.distributed.barrier()
    return summary if dist.main else {"last": last, "weights_checksum": checksum}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(output: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(output) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(output: str | os.PathLike) -> dict[str, Any]:
    """Figures of a finished output directory (from metrics.jsonl)."""
    rows = read_metrics(output)
    losses = [r["loss"] for r in rows]
    steady = rows[1:] if len(rows) > 1 else rows  # the first step includes warm-up costs
    out: dict[str, Any] = {
        "steps": rows[-1]["step"] if rows else 0,
        "samples": int(sum(r["samples"] for r in rows)),
        "tokens": int(sum(r["tokens"] for r in rows)),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "tokens_per_s": (sum(r["tokens"] for r in steady) / max(sum(r["step_time_s"] for r in steady), 1e-9)) if rows else 0.0,
        "samples_per_s": (sum(r["samples"] for r in steady) / max(sum(r["step_time_s"] for r in steady), 1e-9)) if rows else 0.0,
    }
    mfus = [r["mfu"] for r in steady if "mfu" in r]
    if mfus:
        out["mfu"] = float(np.mean(mfus))
    return out


def loss_check(losses: list[float]) -> tuple[bool, str]:
    """Passes when every loss is finite and the mean of the last quarter is below the first quarter's."""
    if not losses:
        return False, "no steps recorded"
    bad = [i + 1 for i, x in enumerate(losses) if not math.isfinite(x)]
    if bad:
        return False, f"non-finite loss at step(s) {bad[:5]}"
    q = max(1, len(losses) // 4)
    first, last = float(np.mean(losses[:q])), float(np.mean(losses[-q:]))
    if len(losses) < 2:
        return False, "a single step: cannot tell whether the loss decreases"
    if last < first:
        return True, f"mean loss of the last quarter {last:.4f} < first quarter {first:.4f}"
    return False, f"mean loss of the last quarter {last:.4f} is not below the first quarter's {first:.4f}"
