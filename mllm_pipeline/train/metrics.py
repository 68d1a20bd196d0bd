"""What a run reports: FLOPs and MFU, the metrics file, the summary and the loss check.

MFU = model FLOPs of the step / (step time x world size x peak). Model FLOPs per sample come from
:func:`mllm_pipeline.model.flops.flops_per_sample` with ``frozen_aware``: a trained weight costs 6N per token, a
frozen weight 4N when a gradient has to flow through it to something trained before it and 2N when nothing
before it trains (the frozen LLM of pretraining still passes gradients back to P-LoRA and the ViT: 4N; a frozen
ViT costs 2N). Attention is counted per sample (packed samples do not attend to each other). Peak dense bf16
tensor-core FLOP/s per GPU (:data:`PEAK_BF16_TFLOPS`, vendor datasheets, no sparsity): H100 SXM / H200 989.4,
H100 PCIe 756, H100 NVL 835, A100 312, L40S 362.05, A10G 125 (A10: 125), L4 121. Unknown cards: set
``peak_tflops``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_pipeline.model import MLLM
from mllm_pipeline.model.flops import count_media, flops_per_sample

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.05, "A10G": 125.0, "A10": 125.0, "L4": 121.0}


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


def batch_flops(model: MLLM, batch, cache: dict, media: list | None = None) -> float:
    """Model FLOPs of one training micro-batch (frozen parts at 2N / 4N, see the module docstring). ``media``: the
    media the model got (``batch_to_device``'s, HD-transformed), needed when the batch holds the loader's uint8."""
    if media is None and getattr(batch, "hd", None) is not None:
        raise ValueError("a batch of uint8 media: pass the HD-transformed media (batch_to_device's) as media")
    total = 0.0
    for seq, m in zip(batch.input_ids, batch.media if media is None else media):
        items = [] if m is None else ([m] if isinstance(m, torch.Tensor) else list(m))
        crops, img = count_media(model, items)
        key = (int(seq.numel()) - len(items) + img, crops, img)
        if key not in cache:
            cache[key] = flops_per_sample(model, key[0], crops, img, frozen_aware=True)["total"]
        total += cache[key]
    return total


def truncate_metrics(path: Path, step: int) -> None:
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
