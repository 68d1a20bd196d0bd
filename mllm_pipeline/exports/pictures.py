"""Videos as pictures, for trainers whose public data code opens no video file.

* InternVL's public finetune code reads a video only through a storage client it does not publish; its
  multi-image path reads plain pictures. So a video is exported as ``n`` frames (:func:`video_frames`), evenly
  spaced from the first to the last, each a JPEG, and the record lists them.
* InternLM-XComposer-2.5 gives its model a video as *one* picture: the sampled frames scaled so the longer side is
  1,120 pixels and laid out in one column (landscape frames) or one row (portrait), each under a 40-pixel band
  with its label ``<IMAGE i>`` and separated by a 2-pixel line in a 10-pixel gap (the layout of ``frame2img`` in
  the released IXC-2.5 model code). Its finetune code reads pictures only, so :func:`composite` writes that
  picture. The label font is Pillow's built-in one (the release draws with SimHei, which is not redistributable
  here); only the label glyphs differ.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from mllm_pipeline.vision.frames import sample_frames

JPEG_QUALITY = 95
COMPOSITE_SIDE = 1120  # the longer side of each frame in the IXC-2.5 layout
LABEL_BAND, GAP, LINE = 40, 10, 2


def video_frames(data: bytes, n: int, name: str = "<clip>") -> list[Image.Image]:
    """``n`` evenly spaced RGB frames of a clip at its own size (all of them when it has fewer); raises
    ``VideoDecodeError`` (a ``ValueError``) naming ``name`` for bytes that are not a decodable video."""
    sample = sample_frames(data, n=max(2, n), max_side=None, gray=False, name=name)
    frames = [Image.fromarray(f) for f in sample.frames]
    return frames if n >= 2 else frames[:1]


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=LABEL_BAND)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def composite(frames: list[Image.Image]) -> Image.Image:
    """One picture of ``frames`` in the IXC-2.5 layout (see the module docstring)."""
    if not frames:
        raise ValueError("no frames to compose")
    w0, h0 = frames[0].size
    landscape = w0 > h0
    scaled = []
    for f in frames:
        w, h = f.size
        if w > h:
            size = (COMPOSITE_SIDE, int(COMPOSITE_SIDE * h / w))
        else:
            size = (int(COMPOSITE_SIDE * w / h), COMPOSITE_SIDE)
        scaled.append(f.resize(size, Image.BILINEAR))
    font = _font()
    if landscape:
        width = max(f.width for f in scaled)
        height = sum(f.height + GAP + LABEL_BAND for f in scaled)
    else:
        width = sum(f.width + GAP for f in scaled)
        height = max(f.height for f in scaled) + LABEL_BAND
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    pos = 0
    for i, f in enumerate(scaled):
        last = i + 1 == len(scaled)
        if landscape:
            out.paste(f, (0, pos + LABEL_BAND))
            draw.text((0, pos), f"<IMAGE {i}>", font=font, fill="black")
            if not last:
                y = pos + LABEL_BAND + f.height + GAP // 2
                draw.line([(0, y), (width, y)], fill="black", width=LINE)
            pos += f.height + GAP + LABEL_BAND
        else:
            out.paste(f, (pos, LABEL_BAND))
            draw.text((pos, 0), f"<IMAGE {i}>", font=font, fill="black")
            if not last:
                x = pos + f.width + GAP // 2
                draw.line([(x, 0), (x, height)], fill="black", width=LINE)
            pos += f.width + GAP
    return out
