"""An InternLM-XComposer2-4KHD-style MLLM in plain PyTorch + Hugging Face transformers.

* ``config.py``: ``MLLMConfig`` (JSON-serialisable) and ``tiny_config()`` (small random model, offline).
* ``vision.py``: HD crops + global view in one ViT pass, 2x2 merge, newline / separator layout.
* ``plora.py``: Partial LoRA (low-rank update at image positions only).
* ``mllm.py``: ``MLLM`` (input building, forward, generate, save / load) and ``build_model``.
* ``phases.py``: the training-phase presets ``pretrain`` / ``sft``, returning optimizer parameter groups.
* ``flops.py``: FLOPs estimates for MFU.
"""

from .config import MLLMConfig, tiny_config
from .flops import count_media, flops_per_sample, flops_per_token
from .mllm import MLLM, MLLMInputs, MLLMOutput, build_model, load_config, load_llm, load_vision_tower
from .plora import ImageMask, PLoRALinear, apply_plora, find_linear_targets
from .phases import pretrain, sft
from .vision import VisionEncoder, image_token_count, merge_2x2, video_token_count

__all__ = [
    "MLLM",
    "MLLMConfig",
    "MLLMInputs",
    "MLLMOutput",
    "ImageMask",
    "PLoRALinear",
    "VisionEncoder",
    "apply_plora",
    "build_model",
    "count_media",
    "find_linear_targets",
    "flops_per_sample",
    "flops_per_token",
    "image_token_count",
    "load_config",
    "load_llm",
    "load_vision_tower",
    "merge_2x2",
    "pretrain",
    "sft",
    "tiny_config",
    "video_token_count",
]
