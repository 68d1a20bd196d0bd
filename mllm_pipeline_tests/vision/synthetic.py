"""A labelled set of synthetic clips for watermark detection and removal: moving content with and without a
static, semi-transparent overlay, and still scenes without one.

Content: a textured canvas (smooth noise at several scales plus hard-edged shapes) seen through a window that pans
at a random speed and direction, with a few sprites moving on their own and a little sensor noise; a still scene is
the same canvas through a fixed window with only sensor noise. Overlays are alpha masks rendered with Pillow:

* ``text``: a word in a sans font (stock-site word marks);
* ``logo``: outlined shapes (ring, rounded square, triangle) and a bar, like a logo plus a rule;
* ``webvid_mark(...)``: one fixed mark (a logo ring and a word mark, centred, about 60% of the width), the same at
  the same place in every clip, like WebVid's stock-site watermark.

An overlay is blended as ``out = (1 - a) * content + a * colour`` with ``a = opacity * coverage``. Each
``SyntheticClip`` keeps the clean source frames, so removal can be scored by PSNR inside the true region.
"""

from __future__ import annotations

import dataclasses
import string
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw

from mllm_pipeline.demo.marks import Overlay, draw_logo, draw_text, webvid_mark
from mllm_pipeline.vision.frames import encode_video

__all__ = ["Overlay", "SyntheticClip", "render_mark", "webvid_mark", "moving_content", "labelled_set", "detection_by_opacity"]

WORDS = ["stockclip", "footagebox", "pixelreel", "motionstock", "clipvault", "framebank", "videostock", "reelmark"]


def render_mark(width: int, height: int, rng: np.random.Generator, kind: str | None = None,
                scale: float | None = None, center: tuple[float, float] | None = None,
                opacity: float = 0.4, color: tuple[int, int, int] = (255, 255, 255)) -> Overlay:
    """A random mark: ``kind`` ``text`` or ``logo`` (random if None), ``scale`` its width as a fraction of the
    frame's (random 0.25-0.6), ``center`` as fractions of the frame (random, the mark kept inside)."""
    kind = kind or ("text" if rng.random() < 0.5 else "logo")
    scale = float(scale if scale is not None else rng.uniform(0.25, 0.6))
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    mw = max(8, int(width * scale))
    if kind == "text":
        word = str(rng.choice(WORDS)) if rng.random() < 0.7 else "".join(rng.choice(list(string.ascii_lowercase), 7))
        size = max(8, int(mw / (0.55 * len(word))))
        mh = int(size * 1.2)
    else:
        mh = max(8, int(mw * rng.uniform(0.35, 0.6)))
    mw, mh = min(mw, width - 4), min(mh, height - 4)
    if center is None:
        cx = rng.uniform(mw / 2 + 2, width - mw / 2 - 2)
        cy = rng.uniform(mh / 2 + 2, height - mh / 2 - 2)
    else:
        cx, cy = center[0] * width, center[1] * height
    x0, y0 = int(cx - mw / 2), int(cy - mh / 2)
    if kind == "text":
        draw_text(draw, (int(cx), int(cy)), word, size)
    else:
        stroke = max(2, mh // 8)
        shape = str(rng.choice(["ring", "square", "triangle"]))
        draw_logo(draw, (x0, y0, x0 + mh, y0 + mh), shape, stroke)
        bar_h = max(2, mh // 5)
        bx0 = x0 + mh + max(2, mh // 4)
        draw.rectangle([bx0, y0 + mh // 2 - bar_h, x0 + mw, y0 + mh // 2], fill=255)
        draw.rectangle([bx0, y0 + mh // 2 + bar_h, x0 + mw - mw // 4, y0 + mh // 2 + bar_h + max(1, bar_h // 2)], fill=255)
    return Overlay(np.asarray(img, np.float32) / 255.0, float(opacity), tuple(int(c) for c in color), kind)


def _smooth_noise(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    import cv2

    out = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 60.0), (12, 35.0), (40, 20.0)):
        small = rng.normal(0, 1, (max(2, h * cells // w), cells, 3)).astype(np.float32)
        small = 0.7 * small[..., :1] + 0.45 * small  # mostly luminance, some colour
        out += amp * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return out + rng.uniform(70, 180, 3).astype(np.float32)


def _shapes(canvas: np.ndarray, rng: np.random.Generator, count: int) -> None:
    import cv2

    h, w = canvas.shape[:2]
    for _ in range(count):
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(4, max(6, h // 4)))
        r = rng.random()
        if r < 0.4:
            cv2.rectangle(canvas, (x, y), (x + s, y + int(s * rng.uniform(0.3, 2))), color, -1)
        elif r < 0.8:
            cv2.ellipse(canvas, (x, y), (s, int(s * rng.uniform(0.3, 1))), float(rng.uniform(0, 180)), 0, 360, color, -1)
        else:
            cv2.line(canvas, (x, y), (x + int(rng.integers(-3 * s, 3 * s)), y + int(rng.integers(-s, s))), color,
                     int(rng.integers(1, 4)))


def moving_content(width: int, height: int, n_frames: int, rng: np.random.Generator, still: bool = False,
                   speed: tuple[float, float] = (1.0, 4.0)) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 frames: a panning textured scene with moving sprites, or (``still``) a fixed view
    with sensor noise only. ``speed``: the pan's range in pixels per frame."""
    v = 0.0 if still else float(rng.uniform(*speed))
    ang = float(rng.uniform(0, 2 * np.pi))
    dx, dy = v * np.cos(ang), v * np.sin(ang)
    mx, my = int(abs(dx) * n_frames) + 8, int(abs(dy) * n_frames) + 8
    ch, cw = height + my, width + mx
    canvas = _smooth_noise(ch, cw, rng)
    _shapes(canvas, rng, int(rng.integers(15, 40)))
    ox = mx - 4 if dx < 0 else 4
    oy = my - 4 if dy < 0 else 4
    sprites = []
    if not still:
        for _ in range(int(rng.integers(1, 4))):
            sw, sh = int(rng.integers(width // 12, width // 5)), int(rng.integers(height // 10, height // 4))
            sprite = _smooth_noise(sh, sw, rng)
            sv, sa = rng.uniform(1.5, 5.0), rng.uniform(0, 2 * np.pi)  # sprites move (a still one is content)
            sprites.append((sprite, rng.uniform(0, width - sw), rng.uniform(0, height - sh),
                            sv * np.cos(sa), sv * np.sin(sa)))
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for t in range(n_frames):
        x, y = int(round(ox + dx * t)), int(round(oy + dy * t))
        f = canvas[y : y + height, x : x + width].copy()
        for sprite, sx, sy, vx, vy in sprites:
            sh, sw = sprite.shape[:2]
            px = int(sx + vx * t) % max(1, width - sw)
            py = int(sy + vy * t) % max(1, height - sh)
            f[py : py + sh, px : px + sw] = sprite
        f += rng.normal(0, 1.5, f.shape).astype(np.float32)
        frames[t] = np.clip(f, 0, 255).astype(np.uint8)
    return frames


@dataclasses.dataclass
class SyntheticClip:
    """One labelled clip. ``frames``: what the clip shows (overlay blended in, before encoding); ``clean``: the same
    without the overlay; ``mp4``: ``frames`` encoded (None with ``encode=False``); ``overlay``: None for clean
    clips; ``group``: ``webvid`` (the shared mark), ``varied`` (a random mark), ``clean`` or ``still``."""

    key: str
    frames: np.ndarray
    clean: np.ndarray
    overlay: Overlay | None
    group: str
    still: bool
    fps: int
    mp4: bytes | None = None

    @property
    def label(self) -> bool:
        return self.overlay is not None

    @property
    def opacity(self) -> float:
        return self.overlay.opacity if self.overlay is not None else 0.0


def labelled_set(seed: int = 0, n_webvid: int = 30, n_varied: int = 30, n_clean: int = 24, n_still: int = 8,
                 opacities: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6), width: int = 256, height: int = 144,
                 n_frames: int = 40, fps: int = 10, encode: bool = True, crf: int = 23) -> list[SyntheticClip]:
    """A deterministic labelled set: ``n_webvid`` clips with the shared ``webvid_mark`` (same mark, same place),
    ``n_varied`` with a random mark each (kind, size, position), ``n_clean`` moving clips without a mark and
    ``n_still`` still scenes without one. Opacities cycle through ``opacities``. With ``encode`` each clip is
    also encoded to MP4 (H.264, ``crf``)."""
    rng = np.random.default_rng(seed)
    shared = webvid_mark(width, height)
    clips: list[SyntheticClip] = []
    plan = ([("webvid", i) for i in range(n_webvid)] + [("varied", i) for i in range(n_varied)]
            + [("clean", i) for i in range(n_clean)] + [("still", i) for i in range(n_still)])
    for n, (group, i) in enumerate(plan):
        still = group == "still"
        clean = moving_content(width, height, n_frames, rng, still=still)
        overlay = None
        if group == "webvid":
            overlay = shared.with_opacity(opacities[i % len(opacities)])
        elif group == "varied":
            color = (255, 255, 255) if rng.random() < 0.75 else (230, 230, 230)
            overlay = render_mark(width, height, rng, opacity=opacities[i % len(opacities)], color=color)
        frames = overlay.apply(clean) if overlay is not None else clean
        mp4 = encode_video(frames, Fraction(fps), crf=crf) if encode else None
        clips.append(SyntheticClip(f"{n:05d}_{group}", frames, clean, overlay, group, still, fps, mp4))
    return clips


def detection_by_opacity(clips: list[SyntheticClip], predicted: list[bool]) -> list[dict]:
    """Precision/recall/F1 per opacity band: each band is scored on its watermarked clips plus every clip without
    an overlay (so each band's precision counts all false positives). A last row, ``still``, counts the still
    scenes flagged (false positives among ``n`` still clips)."""
    from mllm_pipeline.vision.watermark import detection_metrics

    if len(clips) != len(predicted):
        raise ValueError(f"{len(clips)} clips but {len(predicted)} predictions")
    neg = [i for i, c in enumerate(clips) if not c.label]
    rows = []
    for band in sorted({round(c.opacity, 2) for c in clips if c.label}):
        idx = [i for i, c in enumerate(clips) if c.label and round(c.opacity, 2) == band] + neg
        m = detection_metrics([predicted[i] for i in idx], [clips[i].label for i in idx])
        rows.append({"band": f"{band:.1f}", "positives": m["tp"] + m["fn"], **m})
    still = [i for i, c in enumerate(clips) if c.still]
    rows.append({"band": "still", "n": len(still), "fp": sum(bool(predicted[i]) for i in still)})
    return rows
