"""``TrainConfig`` (every option of a run, JSON-serialisable), the paper's presets and the learning-rate schedule.

Presets (``preset``): the recipe of InternLM-XComposer2-4KHD as this project reads the paper; a preset fills every
option the user leaves out (an explicit option always wins):

* ``pretrain``: LLM frozen; the ViT, the connector (projector, newline, separator) and P-LoRA train; lr 2e-4
  with a 1 % linear warmup and a cosine to zero; the ViT's layer-wise lr decay 0.9 (the last block at the full
  lr, each block below it 0.9 times the one above); AdamW betas (0.9, 0.95), weight decay 0.1.
* ``sft``: everything trains; lr 5e-5 for the LLM, P-LoRA and connector, the same 1 % warmup, cosine to zero and
  ViT decay 0.9.

The exact learning rates and weight decay are our reading of the paper and its released fine-tuning scripts;
check them against your copy before a long run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from mllm_pipeline.model.phases import PHASES

PRESETS: dict[str, dict[str, Any]] = {
    "pretrain": {"stage": "pretrain", "lr": 2e-4, "warmup_ratio": 0.01, "min_lr_ratio": 0.0,
                 "vision_layer_decay": 0.9, "betas": (0.9, 0.95), "weight_decay": 0.1},
    "sft": {"stage": "sft", "lr": 5e-5, "llm_lr_scale": 1.0, "warmup_ratio": 0.01, "min_lr_ratio": 0.0,
            "vision_layer_decay": 0.9, "betas": (0.9, 0.95), "weight_decay": 0.1},
}
PRECISIONS = ("auto", "mixed", "fp32", "bf16")


class TrainError(ValueError):
    """A configuration or input problem, reported without a traceback by the CLI."""


@dataclasses.dataclass
class TrainConfig:
    preset: str = ""  # "", "pretrain" or "sft": the paper's recipe for every option not given
    stage: str = "pretrain"  # the training phase: pretrain | sft (mllm_pipeline.model.phases)
    lr: float = 2e-4
    llm_lr_scale: float = 0.1  # sft: the base LLM's lr = lr * llm_lr_scale
    vision_lr_scale: float = 1.0
    vision_layer_decay: float = 1.0  # ViT block i of L: lr * decay ** (L - 1 - i) (embeddings: decay ** L)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0  # 0 disables clipping
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a fraction of max_steps (used when warmup_steps is 0)
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    max_steps: int = 30
    tokens_per_batch: int = 8192  # tokens per micro-batch per rank (packed: the row's budget; else padded size)
    packing: bool = True  # several samples per row up to tokens_per_batch, attention kept inside each sample
    buffer_rows: int = 512
    grad_accum: int = 1
    grad_checkpointing: bool = False
    # "auto": "mixed" on CUDA, "fp32" on the CPU. "mixed": frozen weights in bfloat16, trainable weights (and
    # their AdamW states) in float32, bf16 autocast. "bf16": everything bfloat16 (not recommended for training).
    precision: str = "auto"
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on the CPU)
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # newest N kept (0: all)
    log_every: int = 1
    val_every: int = 0  # validation loss on the val split every N steps (0: never; also at the end when > 0)
    val_batches: int = 8  # batches of the val split per validation
    # FSDP2 (torch.distributed.fsdp.fully_shard) per LLM decoder layer and per ViT block, bf16 mixed precision on
    # CUDA; checkpoints are torch.distributed.checkpoint directories that load on any world size.
    fsdp: bool = False
    # start from these weights: an official InternLM-XComposer2-4KHD checkpoint directory (converted on load) or
    # a directory written by MLLM.save_pretrained
    init_from: str = ""
    device: str = ""  # "" = cuda when available, else cpu
    peak_tflops: float = 0.0  # per-GPU peak for MFU; 0 = from PEAK_BF16_TFLOPS
    prefetch: int = 2  # loader "thread": batches the decode thread keeps ready
    # "workers": DataLoader worker processes, each rank (and worker) reading only its own shards, uint8 media
    # pinned and HD-transformed on the device; "thread": one decode thread per rank over every tar (the old path)
    loader: str = "workers"
    num_workers: int = 2  # per rank (at most the shards per rank); 0 = decode in the training process
    prefetch_factor: int = 2  # batches each worker keeps ready
    pin_memory: bool = True  # page-locked batches (CUDA only)
    # images of these datasets at their own hd_num (token counts recomputed from the manifests' sizes)
    hd_num_by_dataset: dict[str, int] = dataclasses.field(default_factory=dict)
    # the model: {"tiny": true, ...tiny_config overrides} or MLLMConfig fields (vision, llm, hd_num, adapter ...)
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"tiny": True})

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise TrainError(f"preset must be one of {sorted(PRESETS)} (or empty), got {self.preset!r}")
        if self.stage not in PHASES:
            raise TrainError(f"stage must be one of {sorted(PHASES)}, got {self.stage!r}")
        for name in ("max_steps", "tokens_per_batch", "grad_accum", "log_every", "buffer_rows", "val_batches"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise TrainError(f"lr must be positive, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 < self.vision_layer_decay <= 1:
            raise TrainError(f"vision_layer_decay must be in (0, 1], got {self.vision_layer_decay}")
        if self.loader not in ("workers", "thread"):
            raise TrainError(f"loader must be 'workers' or 'thread', got {self.loader!r}")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise TrainError("num_workers must be >= 0 and prefetch_factor >= 1")
        if self.hd_num_by_dataset and self.loader != "workers":
            raise TrainError("hd_num_by_dataset needs loader='workers'")
        for name, v in self.hd_num_by_dataset.items():
            if not isinstance(v, int) or v < 1:
                raise TrainError(f"hd_num_by_dataset[{name!r}] must be a positive integer, got {v!r}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    @property
    def warmup(self) -> int:
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.max_steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        preset = d.get("preset") or ""
        if preset and preset not in PRESETS:
            raise TrainError(f"preset must be one of {sorted(PRESETS)} (or empty), got {preset!r}")
        return cls(**{**PRESETS.get(preset, {}), **d})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Identity of a run for resuming: everything but max_steps / checkpointing / logging / device choices."""
        skip = {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "device", "peak_tflops", "prefetch",
                "prefetch_factor", "pin_memory", "val_every", "val_batches"}
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def resolved_precision(self, device_type: str) -> str:
        if self.precision != "auto":
            return self.precision
        return "mixed" if device_type == "cuda" and self.bf16 else "fp32"


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup over the warmup steps, then cosine from 1 to ``min_lr_ratio`` at ``max_steps``."""
    warmup = cfg.warmup

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, cfg.max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
