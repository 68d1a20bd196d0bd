"""The official InternLM-XComposer2-4KHD image preprocessing, transcribed for the tests (read, not copied).

Source: github InternLM/InternLM-XComposer @ 0f70c3e3911189de1869396b4017714c31821e3a,
``InternLM-XComposer-2.0/finetune/ixc_utils.py`` (``HD_transform``, ``padding_336``) and
``InternLM-XComposer-2.0/finetune/data_mix.py`` (``ImageProcessorHD``: ``Image.open(path).convert("RGB")``, then
``HD_transform``, ``ToTensor()``, ``Normalize(mean, std)``). torchvision's functional ops on a PIL image are
Pillow calls (``resize`` -> ``Image.resize(..., BILINEAR)``, ``pad`` -> ``ImageOps.expand``) and ``ToTensor`` /
``Normalize`` are ``float().div(255)`` and ``sub_(mean).div_(std)``; they are written out here so the tests need
no torchvision.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def official_hd_transform(img: Image.Image, hd_num: int) -> Image.Image:
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # transforms.functional.resize(img, [new_h, new_w])
    width, height = img.size  # padding_336
    tar = int(np.ceil(height / 336) * 336)
    top = int((tar - height) / 2)
    bottom = tar - height - top
    img = ImageOps.expand(img, border=(0, top, 0, bottom), fill=(255, 255, 255))
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def official_tensor(img: Image.Image, hd_num: int) -> torch.Tensor:
    """ImageProcessorHD on an opened image: HD_transform, ToTensor, Normalize -> (3, H, W) float32."""
    pic = official_hd_transform(img.convert("RGB"), hd_num)
    x = torch.from_numpy(np.array(pic, copy=True)).view(pic.size[1], pic.size[0], 3).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    mean = torch.as_tensor(MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(STD, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def official_tensor_from_bytes(data: bytes, hd_num: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return official_tensor(im.convert("RGB"), hd_num)
