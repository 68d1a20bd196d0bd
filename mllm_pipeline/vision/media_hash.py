"""Content hashes of downloaded media, for media-level de-duplication.

For each stored sample of a media shard:

* ``content``: a 128-bit BLAKE2b digest of the stored bytes (exact copies: the same file re-hosted under several
  URLs, or re-downloaded by two datasets);
* ``phash``: perceptual hashes (64-bit DCT hash, :func:`imagehash.phash`): one for an image; for a video, one per
  sampled frame (``video_frames`` evenly spaced frames, the first and last left out because fades and titles make
  them alike across unrelated clips). Near copies (re-encoded, resized, lightly cropped) differ in a few bits.

The perceptual hash comes from ``imagehash`` (a maintained library; its DCT hash is what near-duplicate image
tools use); frames are decoded with PyAV through :func:`mllm_pipeline.vision.frames.sample_frames`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

#: Bump when the hashes computed for the same bytes change.
CODE_VERSION = "media-hash-1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")

HASH_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),  # the webdataset key in the media shard
    pa.field("media_kind", pa.string(), nullable=False),  # image | video
    pa.field("content", pa.binary(16)),  # BLAKE2b-128 of the stored bytes
    pa.field("phash", pa.list_(pa.uint64())),  # one per image, one per sampled frame of a video
    pa.field("error", pa.string()),  # why no perceptual hash could be computed (undecodable media)
])


@dataclasses.dataclass(frozen=True)
class HashConfig:
    """``hash_size``: side of the DCT hash (8 gives 64 bits); ``video_frames``: frames hashed per video."""

    hash_size: int = 8
    video_frames: int = 3

    def __post_init__(self) -> None:
        if self.hash_size != 8:
            raise ValueError(f"hash_size must be 8 (64-bit hashes), not {self.hash_size}")
        if not 1 <= self.video_frames <= 16:
            raise ValueError(f"video_frames must be between 1 and 16, not {self.video_frames}")


def content_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _phash_int(img: Any, hash_size: int) -> int:
    import imagehash

    bits = imagehash.phash(img, hash_size=hash_size).hash.reshape(-1)
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def image_phash(data: bytes, config: HashConfig = HashConfig()) -> int:
    """The 64-bit perceptual hash of an encoded image (ValueError when it does not decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L", (128, 128))  # JPEG: decode at reduced size; the hash works on 32x32 anyway
            return _phash_int(img.convert("L"), config.hash_size)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"not a decodable image ({len(data)} bytes): {e}") from None


def video_phashes(data: bytes, config: HashConfig = HashConfig(), name: str = "<clip>") -> list[int]:
    """Perceptual hashes of ``config.video_frames`` evenly spaced inner frames of a clip."""
    from PIL import Image

    from mllm_pipeline.vision.frames import sample_frames

    sample = sample_frames(data, n=config.video_frames + 2, max_side=128, gray=True, name=name)
    frames = sample.frames
    inner = frames[1:-1] if len(frames) > 2 else frames
    return [_phash_int(Image.fromarray(f), config.hash_size) for f in inner]


def hash_members(members: Iterable[tuple[str, dict[str, bytes]]], sample_of: dict[str, str],
                 config: HashConfig = HashConfig()) -> Iterator[dict[str, Any]]:
    """One hash row per stored sample of ``members`` (``(key, {ext: bytes})`` as :func:`iter_shard` yields them);
    ``sample_of`` maps keys to sample ids (keys without a sample are not media rows and are skipped)."""
    for key, files in members:
        sid = sample_of.get(key)
        if sid is None:
            continue
        ext = next((e for e in files if e.lower() in IMAGE_EXTS + VIDEO_EXTS), None)
        if ext is None:
            yield {"sample_id": sid, "key": key, "media_kind": "image", "content": None, "phash": None,
                   "error": f"no media file among {sorted(files)}"}
            continue
        data = files[ext]
        kind = "video" if ext.lower() in VIDEO_EXTS else "image"
        row = {"sample_id": sid, "key": key, "media_kind": kind, "content": content_digest(data), "phash": None, "error": None}
        try:
            row["phash"] = [image_phash(data, config)] if kind == "image" else video_phashes(data, config, name=key)
        except ValueError as e:
            row["error"] = str(e)[:300]
        yield row


def hash_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=HASH_SCHEMA)


def phash_matrix(col: pa.ChunkedArray | pa.Array, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n x frames)`` uint64 hashes of a ``phash`` column, each row padded by repeating its last hash, and the
    mask of rows that have any hash."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    out = np.zeros((n, frames), dtype=np.uint64)
    has = np.zeros(n, dtype=bool)
    if n == 0:
        return out, has
    lens = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    has = lens > 0
    for j in range(frames):
        idx = starts + np.minimum(j, np.maximum(lens - 1, 0))
        out[has, j] = flat[idx[has]]
    return out, has
