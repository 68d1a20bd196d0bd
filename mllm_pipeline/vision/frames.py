"""Frame sampling from MP4 bytes with PyAV: N evenly spaced frames, downscaled to a working size.

``sample_frames(data, n)`` decodes the clip once, front to back, and converts only the frames it keeps (the
conversion and scaling are most of the cost on small clips; decoding itself cannot skip frames of a long-GOP
H.264 stream without seeking back to key frames, which costs more than it saves on short clips such as WebVid's
10-30 s previews). When the container does not state its frame count, frames are kept with a stride that doubles
whenever the buffer fills, so memory stays bounded by ``4 * n`` working-size frames for any clip length.

``decode_video(data)`` decodes every frame at full size (used when a clip is re-encoded, see
``watermark.inpaint_clip``). Anything that is not a decodable video raises ``VideoDecodeError`` naming the clip.
"""

from __future__ import annotations

import dataclasses
import io
from fractions import Fraction

import numpy as np

__all__ = ["VideoDecodeError", "FrameSample", "DecodedVideo", "sample_frames", "decode_video", "encode_video", "working_size"]


class VideoDecodeError(ValueError):
    """The bytes are not a decodable video (empty, truncated, not a container, no video stream, no frames)."""


@dataclasses.dataclass
class FrameSample:
    """Frames sampled from one clip.

    ``frames``: ``(T, H, W)`` uint8 (gray) or ``(T, H, W, 3)`` uint8 (RGB) at the working size;
    ``indices``: the decoded frame number of each; ``width``/``height``: the clip's own size;
    ``frame_count``: frames decoded in total; ``fps``: the stream's average rate (0.0 if unknown).
    """

    frames: np.ndarray
    indices: list[int]
    width: int
    height: int
    frame_count: int
    fps: float


def working_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """``(w, h)`` scaled so that the longer side is at most ``max_side`` (never upscaled), both even and >= 2."""
    if max_side is None or max(width, height) <= max_side:
        w, h = width, height
    else:
        s = max_side / max(width, height)
        w, h = round(width * s), round(height * s)
    return max(2, w - w % 2), max(2, h - h % 2)


def _open(data: bytes, name: str):
    import av

    if not data:
        raise VideoDecodeError(f"{name}: empty input (0 bytes), expected an MP4 clip")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # FFmpeg raises a family of errors (InvalidDataError, EOFError, ...)
        raise VideoDecodeError(f"{name}: not a readable video container ({len(data)} bytes): {exc}") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{name}: the container has no video stream")
    return container


def _convert(frame, w: int, h: int, fmt: str) -> np.ndarray:
    try:
        out = frame.reformat(width=w, height=h, format=fmt, interpolation="AREA")
    except (TypeError, ValueError):  # older PyAV without the interpolation argument
        out = frame.reformat(width=w, height=h, format=fmt)
    return out.to_ndarray()


def sample_frames(data: bytes, n: int = 16, max_side: int | None = 256, gray: bool = True,
                  name: str = "<clip>", threads: int = 1) -> FrameSample:
    """``n`` evenly spaced frames of the clip (first and last included), scaled to at most ``max_side`` pixels on
    the longer side (``None``: the clip's size), gray or RGB. Clips shorter than ``n`` frames give all their frames.

    Raises ``VideoDecodeError`` (a ``ValueError``) naming ``name`` for input that is not a decodable video,
    including a stream that breaks off before any frame was decoded.
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 frames, got {n}")
    container = _open(data, name)
    fmt = "gray" if gray else "rgb24"
    try:
        stream = container.streams.video[0]
        stream.thread_count = threads
        width, height = stream.codec_context.width, stream.codec_context.height
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        declared = int(stream.frames or 0)
        w = h = 0
        if width and height:
            w, h = working_size(width, height, max_side)
        targets = set(np.linspace(0, declared - 1, n).round().astype(int).tolist()) if declared >= 1 else None
        kept: list[tuple[int, np.ndarray]] = []
        stride = 1
        count = 0
        try:
            for frame in container.decode(stream):
                if not w:
                    width, height = frame.width, frame.height
                    w, h = working_size(width, height, max_side)
                if targets is not None:
                    if count in targets:
                        kept.append((count, _convert(frame, w, h, fmt)))
                elif count % stride == 0:
                    kept.append((count, _convert(frame, w, h, fmt)))
                    if len(kept) >= 4 * n:  # keep the buffer bounded: drop every other frame, double the stride
                        kept = kept[::2]
                        stride *= 2
                count += 1
        except Exception as exc:
            if not kept:
                raise VideoDecodeError(f"{name}: the video stream could not be decoded: {exc}") from None
            # a stream truncated after some frames: use what was decoded
    finally:
        container.close()
    if not kept:
        raise VideoDecodeError(f"{name}: the video stream holds no decodable frames")
    if targets is None or len(kept) < min(n, count):
        # frame count unknown or wrong in the header: choose n evenly spaced frames among those kept
        pick = np.unique(np.linspace(0, len(kept) - 1, min(n, len(kept))).round().astype(int))
        kept = [kept[i] for i in pick]
    return FrameSample(frames=np.stack([f for _, f in kept]), indices=[i for i, _ in kept], width=width,
                       height=height, frame_count=count, fps=fps)


@dataclasses.dataclass
class DecodedVideo:
    """Every frame of a clip at full size (``(T, H, W, 3)`` uint8 RGB) and its timing."""

    frames: np.ndarray
    rate: Fraction
    width: int
    height: int


def decode_video(data: bytes, name: str = "<clip>", threads: int = 1) -> DecodedVideo:
    """All frames of the clip, RGB, full size. Raises ``VideoDecodeError`` naming ``name`` on bad input."""
    container = _open(data, name)
    try:
        stream = container.streams.video[0]
        stream.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        frames = []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
        except Exception as exc:
            if not frames:
                raise VideoDecodeError(f"{name}: the video stream could not be decoded: {exc}") from None
    finally:
        container.close()
    if not frames:
        raise VideoDecodeError(f"{name}: the video stream holds no decodable frames")
    arr = np.stack(frames)
    return DecodedVideo(frames=arr, rate=Fraction(rate), width=arr.shape[2], height=arr.shape[1])


def encode_video(frames: np.ndarray, rate: Fraction | float | int, crf: int = 23, codec: str | None = None) -> bytes:
    """MP4 bytes of ``(T, H, W, 3)`` uint8 RGB frames: H.264 (libx264) when the FFmpeg build has it, else MPEG-4
    Part 2. Odd sizes are padded by one edge pixel (yuv420p needs even sizes); ``rate`` is kept."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"expected a non-empty (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    rate = Fraction(rate).limit_denominator(1001) if not isinstance(rate, Fraction) else rate
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = None
        for name in ([codec] if codec else ["libx264", "mpeg4"]):
            try:
                stream = out.add_stream(name, rate=rate)
            except Exception:
                continue
            if name == "libx264":
                stream.options = {"preset": "veryfast", "crf": str(crf)}
            else:
                stream.bit_rate = max(200_000, int(w * h * float(rate) * 0.25))
            break
        if stream is None:
            raise RuntimeError(f"no usable video encoder among {codec or 'libx264, mpeg4'} in this FFmpeg build")
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
