"""Training-phase presets: each sets ``requires_grad`` on the model and returns optimizer parameter groups.

* ``pretrain``: the LLM is frozen; the vision tower, the projector, newline/separator and the adapter
  (P-LoRA / LoRA factors) train.
* ``sft``: everything trains; the LLM's base weights get ``llm_lr_scale`` times the learning rate.

A group is ``{"name", "params", "lr_scale"}`` plus ``"lr"`` (= lr * lr_scale) when ``lr`` is given, so it can be
passed straight to ``torch.optim.AdamW``; a scheduler can rescale with ``lr_scale``. Empty groups are left out.

``vision_layer_decay`` (the paper's 0.9) splits the ViT into one group per block: block ``i`` of ``L`` gets
``decay ** (L - 1 - i)`` times the ViT's lr, the embeddings (and the pre-layernorm) ``decay ** L``, the
post-layernorm the full ViT lr.
"""


from __future__ import annotations

import re

from typing import Any

from .mllm import MLLM


def _vision_depth(name: str, layers: int) -> int:
    """0 for the embeddings / pre-layernorm, i + 1 for encoder block i, layers + 1 after the last block."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return 0 if ("embeddings" in name or "pre_layrnorm" in name) else layers + 1


def _groups(model: MLLM, scales: dict[str, float], lr: float | None, vision_layer_decay: float = 1.0) -> list[dict[str, Any]]:
    groups = []
    layers = int(model.vision.tower.config.num_hidden_layers)
    for part, params in model.parameter_parts().items():
        trainable = [(n, p) for n, p in params if p.requires_grad]
        if not trainable:
            continue
        if part == "vision" and vision_layer_decay != 1.0:
            by_depth: dict[int, list] = {}
            for n, p in trainable:
                by_depth.setdefault(_vision_depth(n, layers), []).append(p)
            split = [(f"vision.{d}", ps, vision_layer_decay ** max(0, layers - d)) for d, ps in sorted(by_depth.items())]
        else:
            split = [(part, [p for _, p in trainable], 1.0)]
        for name, ps, decay in split:
            group: dict[str, Any] = {"name": name, "params": ps, "lr_scale": scales.get(part, 1.0) * decay}
            if lr is not None:
                group["lr"] = lr * group["lr_scale"]
            groups.append(group)
    return groups


def pretrain(model: MLLM, lr: float | None = None, vision_lr_scale: float = 1.0,
             vision_layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Training phase 1 (pretraining): LLM frozen; vision tower, connector (projector, newline, separator) and
    adapter trained."""
    model.set_trainable(vision=True, connector=True, llm=False, adapter=True)
    return _groups(model, {"vision": vision_lr_scale}, lr, vision_layer_decay)


def sft(
    model: MLLM, lr: float | None = None, llm_lr_scale: float = 1.0, vision_lr_scale: float = 1.0,
    vision_layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """Training phase 2 (SFT): everything trained; the base LLM at ``llm_lr_scale`` x lr, the ViT at
    ``vision_lr_scale`` x lr."""
    model.set_trainable(vision=True, connector=True, llm=True, adapter=True)
    return _groups(model, {"llm": llm_lr_scale, "vision": vision_lr_scale}, lr, vision_layer_decay)


#: the training phases by name (``TrainConfig.stage``)
PHASES = {"pretrain": pretrain, "sft": sft}
