"""The dynamic-resolution HD transform of InternLM-XComposer2-4KHD, and the image-token count it implies.

The rules (from the official ``finetune/ixc_utils.py`` and the 4KHD vision tower):

* A portrait image (width < height) is transposed, processed as a landscape image and transposed back.
* With ``ratio = width / height`` (>= 1 after the transpose), ``scale`` is the largest column count with
  ``scale * ceil(scale / ratio) <= hd_num``.
* The image is resized (bilinear) to ``width = scale * 336`` and ``height = int(width / ratio)`` (computed in
  floating point), then padded with white on its short side to the next multiple of 336, centred: the odd pixel
  goes to the bottom (to the right for a portrait image, after the transpose back).

The result is a grid of ``rows x cols`` 336-pixel crops. The model sees each crop and a 336x336 global view as
24x24 patches merged 2x2 into 12x12 = 144 tokens, a newline token after every row of tokens and one separator
between the global and the local view:

    tokens = (rows * cols + 1) * 144 + 1 + (rows + 1) * 12

whose maxima for HD-9/16/25/55 are the paper's 1561/2653/4057/8737 (reached by the tallest images, whose grid is
one column of ``hd_num`` rows).

Extreme aspect ratios: ``int(width / ratio)`` reaches 0 once the ratio exceeds ``scale * 336``; the transform
clamps the resized short side to at least 1 pixel (it is then padded to 336), so any image with at least one
pixel on each side works. A zero-sized image raises ``ValueError``.
"""

from __future__ import annotations

import math

from PIL import Image

PATCH = 336  # the ViT's input size (CLIP ViT-L/14-336)
TOKENS_PER_CROP = 144  # 24x24 patches merged 2x2
TOKENS_PER_ROW = 12  # a newline after every row of 12 merged tokens


def hd_grid_scale(width: int, height: int, hd_num: int) -> int:
    """The number of 336-pixel columns of the (landscape-oriented) image: the largest ``scale`` with
    ``scale * ceil(scale / ratio) <= hd_num``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image must have a positive size, got {width}x{height}")
    if hd_num < 1:
        raise ValueError(f"hd_num must be at least 1, got {hd_num}")
    w, h = (height, width) if width < height else (width, height)
    ratio = w / h
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    return scale - 1


def hd_target_size(width: int, height: int, hd_num: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, resized height), (padded width, padded height)) in the image's own orientation."""
    scale = hd_grid_scale(width, height, hd_num)  # validates the size
    portrait = width < height
    w, h = (height, width) if portrait else (width, height)
    ratio = w / h
    new_w = int(scale * PATCH)
    new_h = max(1, int(new_w / ratio))  # documented clamp for extreme aspect ratios
    pad_h = int(math.ceil(new_h / PATCH) * PATCH)
    if portrait:
        return (new_h, new_w), (pad_h, new_w)
    return (new_w, new_h), (new_w, pad_h)


def hd_grid(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """(rows, cols) of 336-pixel crops the HD transform produces for an image of this size."""
    _, (pw, ph) = hd_target_size(width, height, hd_num)
    return ph // PATCH, pw // PATCH


def hd_token_count(width: int, height: int, hd_num: int) -> int:
    """Image tokens the model sees for an image of this size: ``(rows*cols + 1)*144 + 1 + (rows + 1)*12``."""
    rows, cols = hd_grid(width, height, hd_num)
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * TOKENS_PER_ROW


def hd_transform(image: Image.Image, hd_num: int) -> Image.Image:
    """Resize (bilinear) and white-pad ``image`` exactly as the 4KHD model expects; returns a new RGB image."""
    image = image.convert("RGB")
    portrait = image.width < image.height
    img = image.transpose(Image.Transpose.TRANSPOSE) if portrait else image
    (new_w, new_h), (pad_w, pad_h) = hd_target_size(img.width, img.height, hd_num)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = (pad_h - new_h) // 2
    canvas = Image.new("RGB", (pad_w, pad_h), (255, 255, 255))
    canvas.paste(img, (0, top))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if portrait else canvas
