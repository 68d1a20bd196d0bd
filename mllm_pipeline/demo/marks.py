"""The demo corpus's stock-site mark: a static, semi-transparent overlay blended onto generated WebVid clips.

An overlay is an alpha mask rendered with Pillow and blended as ``out = (1 - a) * content + a * colour`` with
``a = opacity * coverage``. :func:`webvid_mark` is one fixed mark (a logo ring and a word mark, centred, about 60%
of the width), the same at the same place in every clip, like WebVid's stock-site watermark.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Overlay", "webvid_mark", "draw_text", "draw_logo"]


@dataclasses.dataclass
class Overlay:
    """A static overlay: ``coverage`` (H, W) float32 in [0, 1] (the mark's shape, anti-aliased), its ``opacity``
    and RGB ``color``."""

    coverage: np.ndarray
    opacity: float
    color: tuple[int, int, int] = (255, 255, 255)
    kind: str = "text"

    @property
    def alpha(self) -> np.ndarray:
        return self.coverage * np.float32(self.opacity)

    @property
    def mask(self) -> np.ndarray:
        """The true overlay region (pixels at least 25% covered)."""
        return self.coverage >= 0.25

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, exclusive end, of ``mask``."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Blend onto ``(..., H, W, 3)`` frames (any dtype); returns uint8."""
        a = self.alpha[..., None]
        out = (1.0 - a) * frames.astype(np.float32) + a * np.asarray(self.color, np.float32)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def with_opacity(self, opacity: float) -> Overlay:
        return dataclasses.replace(self, opacity=float(opacity))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], word: str, size: int, anchor: str = "mm") -> None:
    draw.text(xy, word, fill=255, font=_font(size), anchor=anchor, stroke_width=max(0, size // 16))


def draw_logo(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], shape: str, width: int) -> None:
    x0, y0, x1, y1 = box
    if shape == "ring":
        draw.ellipse(box, outline=255, width=width)
    elif shape == "square":
        draw.rounded_rectangle(box, radius=max(1, (x1 - x0) // 4), outline=255, width=width)
    else:  # triangle
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], outline=255, width=width)


def webvid_mark(width: int, height: int, opacity: float = 0.4) -> Overlay:
    """The fixed "stock site" mark: a ring logo and a word mark, centred, about 60% of the frame width."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    word = "stockfootage"
    size = max(8, int(width * 0.6 / (0.55 * len(word))))
    ring = int(size * 1.1)
    total = ring + int(width * 0.5)
    x0 = (width - total) // 2
    cy = int(height * 0.5)
    draw_logo(draw, (x0, cy - ring // 2, x0 + ring, cy + ring // 2), "ring", max(2, ring // 7))
    draw_text(draw, (x0 + ring + max(2, ring // 4), cy), word, size, anchor="lm")
    return Overlay(np.asarray(img, np.float32) / 255.0, float(opacity), (255, 255, 255), "webvid")
