"""FLOPs estimates for MFU.

Conventions (PaLM, appendix B): a matmul with an N-parameter weight costs 2N FLOPs per token forward and 4N
backward (activation + weight gradients), so training costs 6N per token; attention scores and the weighted sum
add 4 * n_layers * d_model * T per token forward (T = sequence length; causal masking not discounted), 12x
that for training. Only matmul weights count (nn.Linear, embeddings excluded; the output head included).

Per sample of ``seq_len`` LLM tokens of which ``n_image_tokens`` are image tokens, with ``n_crops`` ViT
inputs (HD crops plus one global view per image / video frame; ``(rows*cols + 1)`` per image):

    vision    = k * N_vit * t + 2k * L_vit * d_vit * t^2        per crop, t = patches + 1 (CLS)
    projector = k * N_proj * n_image_tokens
    llm       = k * N_llm * seq_len + 2k * L_llm * d_llm * seq_len^2
    adapter   = k * N_adapter * (n_image_tokens for P-LoRA, seq_len for LoRA)

with k = 6 for training, 2 for forward only. ``frozen_aware`` replaces the PaLM convention (every weight costs
6N) by what a step really computes: a frozen weight costs 4N when gradients flow through it to something
trainable before it, 2N when nothing before it trains (the ViT when it is frozen; then the ViT's attention
term is also forward-only).
"""

from __future__ import annotations

import torch
from torch import nn

from .mllm import MLLM
from .vision import video_token_count


def _linear_params(module: nn.Module, adapter: bool) -> int:
    total = 0
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and (("lora_" in name) == adapter):
            total += m.in_features * m.out_features
    return total


def _trains(module: nn.Module, adapter: bool = False) -> bool:
    return any(p.requires_grad for n, p in module.named_parameters() if ("lora_" in n) == adapter)


def flops_per_sample(
    model: MLLM,
    seq_len: int,
    n_crops: int = 0,
    n_image_tokens: int = 0,
    training: bool = True,
    frozen_aware: bool = False,
) -> dict[str, float]:
    """FLOPs of one sample by part (vision, projector, llm, adapter) and their ``total``."""
    k = 6 if training else 2
    vcfg, lcfg = model.vision.tower.config, model.llm.config
    t = model.vision.grid**2 + 1

    def factor(trainable: bool, upstream_trains: bool) -> int:
        if not training:
            return 2
        if not frozen_aware or trainable:
            return 6
        return 4 if upstream_trains else 2

    vision_trains = _trains(model.vision.tower)
    proj_trains = _trains(model.projector) or model.vision.newline.requires_grad
    k_v = factor(vision_trains, False)
    k_p = factor(proj_trains, vision_trains)
    k_l = factor(_trains(model.llm), vision_trains or proj_trains or _trains(model.llm, adapter=True))
    attn_v = 2 * k_v * vcfg.num_hidden_layers * vcfg.hidden_size * t * t
    vision = n_crops * (k_v * _linear_params(model.vision.tower, False) * t + attn_v)
    projector = k_p * _linear_params(model.projector, False) * n_image_tokens
    hidden = getattr(lcfg, "hidden_size", None) or model.llm.get_input_embeddings().embedding_dim
    llm = k_l * _linear_params(model.llm, False) * seq_len + 2 * k * lcfg.num_hidden_layers * hidden * seq_len**2
    adapter_tokens = n_image_tokens if model.config.adapter == "plora" else seq_len
    adapter = k * _linear_params(model.llm, True) * adapter_tokens
    parts = {"vision": float(vision), "projector": float(projector), "llm": float(llm), "adapter": float(adapter)}
    parts["total"] = sum(parts.values())
    return parts


def count_media(model: MLLM, items: list[torch.Tensor]) -> tuple[int, int]:
    """(ViT crops incl. global views, image tokens) of media items (image (3, H, W) / video (F, 3, H, W)),
    from their shapes: the ``n_crops`` and ``n_image_tokens`` of ``flops_per_sample``."""
    s, g = model.vision.crop_size, model.vision.grid
    crops = tokens = 0
    for item in items:
        frames = item.shape[0] if item.dim() == 4 else 1
        rows, cols = item.shape[-2] // s, item.shape[-1] // s
        crops += frames * (rows * cols + 1)
        tokens += video_token_count(rows, cols, frames, g)
    return crops, tokens


def flops_per_token(model: MLLM, seq_len: int, training: bool = True) -> float:
    """The LLM's share per token: 6 * N_llm + 12 * n_layers * d_model * seq_len (training; 2N + 4LdT forward)."""
    return flops_per_sample(model, seq_len, training=training)["llm"] / seq_len
