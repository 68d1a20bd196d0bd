"""Helpers for the model tests: HD image tensors and tiny random models (offline, CPU)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mllm_pipeline.model import build_model, tiny_config
from mllm_pipeline.vision.hd import hd_transform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hd_tensor(width: int, height: int, hd_num: int, seed: int = 0) -> torch.Tensor:
    """A random-noise PIL image of the given size through hd_transform, to a CLIP-normalised (3, H, W) tensor."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = np.asarray(hd_transform(img, hd_num), dtype=np.float32) / 255.0
    x = torch.from_numpy(out).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def make_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides))
