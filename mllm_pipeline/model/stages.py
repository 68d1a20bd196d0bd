"""Training-stage presets: each sets ``requires_grad`` on the model and returns optimizer parameter groups.

* ``pretrain``: the LLM is frozen; the vision tower, the projector, newline/separator and the adapter
  (P-LoRA / LoRA factors) train.
* ``sft``: everything trains; the LLM's base weights get ``llm_lr_scale`` times the learning rate.

A group is ``{"name", "params", "lr_scale"}`` plus ``"lr"`` (= lr * lr_scale) when ``lr`` is given, so it can be
passed straight to ``torch.optim.AdamW``; a scheduler can rescale with ``lr_scale``. Empty groups are left out.
"""

from __future__ import annotations

from typing import Any

from .mllm import MLLM


def _groups(model: MLLM, scales: dict[str, float], lr: float | None) -> list[dict[str, Any]]:
    groups = []
    for part, params in model.parameter_parts().items():
        trainable = [p for _, p in params if p.requires_grad]
        if not trainable:
            continue
        group: dict[str, Any] = {"name": part, "params": trainable, "lr_scale": scales.get(part, 1.0)}
        if lr is not None:
            group["lr"] = lr * group["lr_scale"]
        groups.append(group)
    return groups


def pretrain(model: MLLM, lr: float | None = None, vision_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Stage 1: LLM frozen; vision tower, connector (projector, newline, separator) and adapter trained."""
    model.set_trainable(vision=True, connector=True, llm=False, adapter=True)
    return _groups(model, {"vision": vision_lr_scale}, lr)


def sft(
    model: MLLM, lr: float | None = None, llm_lr_scale: float = 1.0, vision_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Stage 2: everything trained; the base LLM at ``llm_lr_scale`` x lr, the ViT at ``vision_lr_scale`` x lr."""
    model.set_trainable(vision=True, connector=True, llm=True, adapter=True)
    return _groups(model, {"llm": llm_lr_scale, "vision": vision_lr_scale}, lr)


STAGES = {"pretrain": pretrain, "sft": sft}
