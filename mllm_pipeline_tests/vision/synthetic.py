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


# ------------------------------------------------------------------------------------------------------------
# WebVid-like marks, camera behaviours and hard negatives (the per-category benchmark and tests)
# ------------------------------------------------------------------------------------------------------------

#: Frame sizes of the realistic set: WebVid's 16:9 previews (596x336) and smaller, 4:3, 1:1, 9:16, 2.39:1.
SIZES = {"16:9": (596, 336), "16:9-small": (428, 240), "4:3": (448, 336), "1:1": (320, 320), "9:16": (240, 426),
         "2.39:1": (640, 268)}


def stock_mark(width: int, height: int, opacity: float, clip_id: int, color: tuple[int, int, int] = (255, 255, 255)) -> Overlay:
    """A mark laid out like the stock site's on WebVid previews: a thin outlined logo (a rounded square with a
    bracket inside) left of a thin word mark, together about 55% of the frame width, centred; and a small id line
    ("www.stocksite.com · <clip id>") below the centre. Strokes are about one pixel at 596 pixels wide, so the mark
    is thin and, at opacity 0.15, faint. The word mark and logo are the same for every clip of a size; the id line
    differs per clip."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    word = "shutterstock"
    span = 0.55 * min(width, 1.6 * height)  # portrait / square frames: the mark is smaller than the width
    size = max(9, int(span / (0.5 * len(word) + 1.4)))
    font = _font(size)
    tw = int(draw.textlength(word, font=font))
    logo = int(size * 1.05)
    total = logo + size // 3 + tw
    x0 = (width - total) // 2
    cy = height // 2
    stroke = max(1, logo // 16)
    draw.rounded_rectangle([x0, cy - logo // 2, x0 + logo, cy + logo // 2], radius=max(2, logo // 5), outline=255,
                           width=stroke)
    q = logo // 4  # the bracket inside the logo: two corner strokes
    draw.line([(x0 + q, cy - q), (x0 + q, cy + q // 2)], fill=255, width=stroke)
    draw.line([(x0 + q, cy - q), (x0 + 2 * q, cy - q)], fill=255, width=stroke)
    draw.line([(x0 + 3 * q, cy + q), (x0 + 3 * q, cy - q // 2)], fill=255, width=stroke)
    draw.line([(x0 + 3 * q, cy + q), (x0 + 2 * q, cy + q)], fill=255, width=stroke)
    x_word0 = x0 + logo + size // 3
    draw.text((x_word0, cy), word, fill=255, font=font, anchor="lm")
    small = max(7, int(size * 0.32))
    draw.text((width // 2, int(height * 0.5 + logo * 0.9 + small)), f"www.stocksite.com \u00b7 {clip_id}", fill=255,
              font=_font(small), anchor="mm")
    return Overlay(np.asarray(img, np.float32) / 255.0, float(opacity), tuple(int(c) for c in color), "stock")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def camera_content(width: int, height: int, n_frames: int, rng: np.random.Generator, camera: str) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 frames of a scene filmed the way ``camera`` says:

    * ``pan``: the camera pans 1-4 px/frame, sprites move (``moving_content``);
    * ``slow_pan``: a slow drift, 0.3-0.8 px/frame, no sprites;
    * ``tripod``: a fixed camera with sub-pixel shake; one or two subjects (a third to a half of the frame wide)
      move inside it, the rest is still apart from sensor noise;
    * ``timelapse``: a fixed camera; the light changes over the clip and a sky layer drifts across the top;
    * ``still``: a fixed view with sensor noise only.
    """
    import cv2

    if camera == "pan":
        return moving_content(width, height, n_frames, rng)
    if camera == "slow_pan":
        return moving_content(width, height, n_frames, rng, speed=(0.3, 0.8))
    if camera == "still":
        return moving_content(width, height, n_frames, rng, still=True)
    canvas = _smooth_noise(height + 8, width + 8, rng)
    _shapes(canvas, rng, int(rng.integers(15, 40)))
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    if camera == "tripod":
        subjects = []
        for _ in range(int(rng.integers(1, 3))):
            sw, sh = int(width * rng.uniform(0.3, 0.5)), int(height * rng.uniform(0.3, 0.6))
            sprite = _smooth_noise(sh, sw, rng)
            _shapes(sprite, rng, 6)
            subjects.append((sprite, rng.uniform(0, width - sw), rng.uniform(0, height - sh), rng.uniform(-4, 4),
                             rng.uniform(-2, 2)))
        for t in range(n_frames):
            jx, jy = rng.normal(0, 0.25, 2)
            m = np.float32([[1, 0, 4 + jx], [0, 1, 4 + jy]])
            f = cv2.warpAffine(canvas, m, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            for sprite, sx, sy, vx, vy in subjects:
                sh, sw = sprite.shape[:2]
                px = int(np.clip(sx + vx * t, 0, width - sw))
                py = int(np.clip(sy + vy * t, 0, height - sh))
                f[py : py + sh, px : px + sw] = sprite
            f += rng.normal(0, 1.5, f.shape).astype(np.float32)
            frames[t] = np.clip(f, 0, 255).astype(np.uint8)
        return frames
    if camera == "timelapse":
        sky_h = int(height * rng.uniform(0.35, 0.55))
        sky = _smooth_noise(sky_h, width * 3, rng) * np.float32(0.9) + np.float32(30)
        light = np.linspace(rng.uniform(0.6, 0.9), rng.uniform(1.0, 1.3), n_frames).astype(np.float32)
        drift = rng.uniform(4, 9)
        for t in range(n_frames):
            f = canvas[4 : 4 + height, 4 : 4 + width] * light[t]
            x = int(drift * t) % (2 * width)
            f[:sky_h] = sky[:, x : x + width]
            f += rng.normal(0, 1.5, f.shape).astype(np.float32)
            frames[t] = np.clip(f, 0, 255).astype(np.uint8)
        return frames
    raise ValueError(f"unknown camera {camera!r}")


def subtitles(frames: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Burnt-in subtitles: opaque white text with a black outline, a line near the bottom that changes every
    12-20 frames. Returns (frames, the region any line covers)."""
    t, h, w = frames.shape[:3]
    out = frames.copy()
    region = np.zeros((h, w), bool)
    size = max(10, h // 14)
    start = 0
    while start < t:
        end = min(t, start + int(rng.integers(12, 21)))
        words = " ".join(str(rng.choice(WORDS)) for _ in range(int(rng.integers(3, 6))))
        img = Image.new("L", (w, h), 0)
        edge = Image.new("L", (w, h), 0)
        font = _font(size)
        ImageDraw.Draw(edge).text((w // 2, int(h * 0.88)), words, fill=255, font=font, anchor="mm",
                                  stroke_width=max(1, size // 10))
        ImageDraw.Draw(img).text((w // 2, int(h * 0.88)), words, fill=255, font=font, anchor="mm")
        e = np.asarray(edge, np.float32)[..., None] / 255
        f = np.asarray(img, np.float32)[..., None] / 255
        seg = out[start:end].astype(np.float32) * (1 - e)  # black outline
        seg = seg * (1 - f) + 255 * f
        out[start:end] = np.clip(seg, 0, 255).astype(np.uint8)
        region |= np.asarray(edge) > 64
        start = end
    return out, region


def tv_logo(width: int, height: int, rng: np.random.Generator) -> Overlay:
    """A broadcaster's logo: small (about 12% of the width), opaque or nearly (opacity 0.8-1), in a top corner."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    lw = max(16, int(width * 0.12))
    lh = max(10, int(lw * 0.45))
    right = rng.random() < 0.7
    x0 = width - lw - int(width * 0.04) if right else int(width * 0.04)
    y0 = int(height * 0.05)
    draw.rounded_rectangle([x0, y0, x0 + lw, y0 + lh], radius=max(2, lh // 4), fill=255)
    return Overlay(np.asarray(img, np.float32) / 255.0, float(rng.uniform(0.8, 1.0)), (235, 235, 240), "tv_logo")


def letterbox(frames: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Black bars (top and bottom, or left and right: pillarbox), 10-14% of the frame each. Returns (frames, bars)."""
    t, h, w = frames.shape[:3]
    out = frames.copy()
    bars = np.zeros((h, w), bool)
    if rng.random() < 0.7:
        b = int(h * rng.uniform(0.10, 0.14))
        bars[:b] = bars[h - b :] = True
    else:
        b = int(w * rng.uniform(0.10, 0.14))
        bars[:, :b] = bars[:, w - b :] = True
    out[:, bars] = rng.integers(0, 12)
    return out, bars


def still_graphic(width: int, height: int, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A title card: a flat or gradient background with large opaque text and a shape, unchanged over the clip
    except for sensor / coding noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    bg = c0 + (c1 - c0) * (x / width)[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.text((width // 2, height // 2), " ".join(str(rng.choice(WORDS)) for _ in range(2)), fill=(255, 255, 255),
              font=_font(max(12, height // 8)), anchor="mm")
    draw.ellipse([width // 10, height // 10, width // 10 + height // 5, height // 10 + height // 5],
                 outline=(255, 255, 255), width=3)
    base = np.asarray(img, np.float32)
    noise = rng.normal(0, 1.5, (n_frames, height, width, 3)).astype(np.float32)
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


@dataclasses.dataclass
class CategoryClip:
    """One clip of the realistic set: ``category`` (what the benchmark reports by), ``label`` (carries the stock
    mark), ``size_name`` (a key of ``SIZES``), the true mark ``overlay`` (None for negatives) and the MP4 bytes."""

    key: str
    category: str
    label: bool
    size_name: str
    width: int
    height: int
    opacity: float
    overlay: Overlay | None
    mp4: bytes
    clean: np.ndarray | None = None


#: category -> (camera, has the stock mark, hard negative kind or None)
CATEGORIES = {
    "mark_pan": ("pan", True, None),
    "mark_slow_pan": ("slow_pan", True, None),
    "mark_tripod": ("tripod", True, None),
    "mark_timelapse": ("timelapse", True, None),
    "mark_still": ("still", True, None),
    "clean_pan": ("pan", False, None),
    "clean_tripod": ("tripod", False, None),
    "clean_timelapse": ("timelapse", False, None),
    "subtitles": ("pan", False, "subtitles"),
    "tv_logo": ("pan", False, "tv_logo"),
    "letterbox": ("pan", False, "letterbox"),
    "still_graphic": ("still", False, "still_graphic"),
}


def realistic_set(seed: int = 0, per_category: int = 6, opacities: tuple[float, ...] = (0.15, 0.25, 0.35, 0.5),
                  sizes: tuple[str, ...] = tuple(SIZES), n_frames: int = 32, fps: int = 8, crf: int = 23,
                  categories: tuple[str, ...] = tuple(CATEGORIES), keep_clean: bool = False) -> list[CategoryClip]:
    """``per_category`` clips of every category in ``CATEGORIES``, sizes and opacities cycling, encoded to MP4.
    Marked clips carry ``stock_mark`` (each with its own id line). Deterministic for the same arguments."""
    rng = np.random.default_rng(seed)
    clips: list[CategoryClip] = []
    n = 0
    for cat in categories:
        camera, marked, negative = CATEGORIES[cat]
        for i in range(per_category):
            size_name = sizes[n % len(sizes)]
            w, h = SIZES[size_name]
            if negative == "still_graphic":
                frames = still_graphic(w, h, n_frames, rng)
            else:
                frames = camera_content(w, h, n_frames, rng, camera)
            clean = frames
            if negative == "subtitles":
                frames, _ = subtitles(frames, rng)
            elif negative == "tv_logo":
                frames = tv_logo(w, h, rng).apply(frames)
            elif negative == "letterbox":
                frames, _ = letterbox(frames, rng)
            overlay = None
            opacity = 0.0
            if marked:
                opacity = opacities[i % len(opacities)]
                color = (255, 255, 255) if rng.random() < 0.8 else (225, 225, 225)
                overlay = stock_mark(w, h, opacity, int(rng.integers(10**8, 10**9)), color)
                frames = overlay.apply(frames)
            mp4 = encode_video(frames, Fraction(fps), crf=crf)
            clips.append(CategoryClip(f"{n:05d}_{cat}", cat, marked, size_name, w, h, opacity, overlay, mp4,
                                      clean if keep_clean else None))
            n += 1
    return clips
