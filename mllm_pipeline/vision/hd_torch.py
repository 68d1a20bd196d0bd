"""Batched tensor path of the 4KHD HD transform for a training data loader: decode, resize, pad, normalise.

This is the tensor counterpart of :func:`mllm_pipeline.vision.hd.hd_transform` followed by the CLIP
``ToTensor() + Normalize(mean, std)`` the model's ``vis_processor`` applies. Output sizes are exactly
:func:`~mllm_pipeline.vision.hd.hd_target_size`'s padded size, and the white padding sits where ``hd_transform``
puts it (centred on the short side, the odd row at the bottom, or the odd column on the right for a portrait
image).

Pipeline
--------
``decode_images`` -> ``hd_transform_tensor`` (per image; sizes differ) -> optionally ``stack_padded`` /
``group_by_size`` to batch, and ``global_view`` / ``hd_crops`` for what the vision tower consumes.

* **Decode.** On the CPU with Pillow (``Image.open(...).convert("RGB")``, as the official loader does; no EXIF
  rotation). With ``device="cuda"`` and torchvision installed, JPEGs are decoded on the GPU with
  ``torchvision.io.decode_jpeg(device="cuda")`` (other formats, or a JPEG nvJPEG rejects, go through Pillow and
  are copied to the GPU). torchvision is optional; nothing here needs it on the CPU.
* **Resize (CPU, the default there): the official pixels.** The image goes through
  :func:`~mllm_pipeline.vision.hd.hd_transform` (Pillow: the official ``HD_transform``'s transpose, ``BILINEAR``
  resize, white padding and transpose back) and is normalised with the official operations in the official order,
  ``ToTensor`` (``x.float().div(255)``) then ``Normalize`` (``.sub(mean).div(std)`` in float32): the tensors are
  bit for bit those of the official ``ImageProcessorHD`` (``InternLM-XComposer-2.0/finetune/data_mix.py``).
  ``mllm_pipeline_tests/vision/test_hd_torch.py`` checks it against a transcription of the official code.
* **Resize (fast kernels, ``resize="uint8"`` / ``"float"``).** ``torch.nn.functional.interpolate(mode="bilinear",
  antialias=True, align_corners=False)``, the same triangle filter Pillow's ``BILINEAR`` uses: on the CPU on the
  ``uint8`` image in channels-last layout (about 5x faster than Pillow on one core), or in float (what runs on the
  GPU, where there is no uint8 kernel and no Pillow). A portrait image is resized directly to the transposed target
  size and padded left and right (the resize is separable). They are close to, not equal to, the official pixels:
  in 0..255 units, uint8 kernel mean absolute difference 0.0003-0.24 (rounding; portraits pass in the other order
  than Pillow's transposed image), max 2; float kernel mean 0.09-0.31 (not rounded to integers), max 1; the
  padding is identical, pixel for pixel. They normalise as ``x * scale + shift`` (one multiply-add per channel).
* **Normalise.** The padding is normalised white computed as the official path computes it, ``(255/255 - mean) /
  std`` (:func:`normalised_white`), on every path.

``global_view`` is the model's 336x336 global image: ``interpolate(mode="bicubic", align_corners=False)`` of the
normalised padded HD image, without antialiasing, as the 4KHD vision tower computes it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mllm_pipeline.vision.hd import PATCH, hd_target_size

# CLIP ViT-L/14-336 normalisation (the model's vis_processor).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageDecodeError",
    "decode_image",
    "decode_images",
    "global_view",
    "group_by_size",
    "hd_batch",
    "hd_crops",
    "hd_transform_tensor",
    "normalised_white",
    "stack_padded",
]

_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageDecodeError(ValueError):
    """An image's bytes could not be decoded; ``index`` and ``key`` say which one."""

    def __init__(self, index: int, key: Any, cause: BaseException | str):
        self.index = index
        self.key = key
        where = f"image {index}" + (f" (key {key!r})" if key is not None else "")
        super().__init__(f"cannot decode {where}: {cause}")


# ----------------------------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------------------------


def _as_bytes(blob: Any) -> bytes | memoryview:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return blob
    if isinstance(blob, np.ndarray) and blob.dtype == np.uint8 and blob.ndim == 1:
        return memoryview(blob)
    if isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.ndim == 1:
        return memoryview(blob.cpu().numpy())
    raise TypeError(f"expected encoded image bytes, got {type(blob).__name__}")


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) tensor in channels-last strides (an (H, W, 3) buffer, permuted: no copy
    beyond Pillow's own ``tobytes``)."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    buf = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return buf.view(h, w, 3).permute(2, 0, 1)


def decode_image(blob: Any, *, index: int = 0, key: Any = None) -> torch.Tensor:
    """Decode one encoded image on the CPU with Pillow -> uint8 (3, H, W), channels-last strides.

    Any format Pillow reads; palette, grey, CMYK and alpha images are converted to RGB (alpha dropped), as the
    official loader's ``.convert("RGB")`` does. Raises :class:`ImageDecodeError` naming ``index``/``key``.
    """
    try:
        data = _as_bytes(blob)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
        if rgb.width < 1 or rgb.height < 1:
            raise ValueError(f"empty image {rgb.width}x{rgb.height}")
        return _pil_to_tensor(rgb)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the bytes is reported with its index/key
        raise ImageDecodeError(index, key, f"{type(exc).__name__}: {exc}") from exc


def _torchvision_decode_jpeg():
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - torchvision is optional (and may be installed but broken)
        return None
    return decode_jpeg, ImageReadMode


def _gpu_decode_jpegs(datas: list[bytes | memoryview], device: torch.device) -> list[torch.Tensor | None] | None:
    """Batch-decode JPEGs with nvJPEG; ``None`` entries (or ``None`` overall) fall back to Pillow."""
    tv = _torchvision_decode_jpeg()
    if tv is None or not datas:
        return None
    decode_jpeg, mode = tv
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        out = decode_jpeg(encoded, mode=mode.RGB, device=device)
        return list(out)
    except Exception:  # noqa: BLE001 - one bad or unsupported JPEG fails the batch: retry one by one
        pass
    results: list[torch.Tensor | None] = []
    for enc in encoded:
        try:
            results.append(decode_jpeg(enc, mode=mode.RGB, device=device))
        except Exception:  # noqa: BLE001
            results.append(None)
    return results


def decode_images(
    blobs: Sequence[Any], device: str | torch.device = "cpu", *, keys: Sequence[Any] | None = None
) -> list[torch.Tensor]:
    """Decode encoded images -> list of uint8 (3, H, W) tensors on ``device``.

    On the CPU: Pillow. On CUDA with torchvision available: JPEGs are batch-decoded by nvJPEG on the GPU, the rest
    (and any JPEG nvJPEG rejects) by Pillow and copied over. Bad bytes raise :class:`ImageDecodeError` naming the
    index (and ``keys[index]`` when given).
    """
    if keys is not None and len(keys) != len(blobs):
        raise ValueError(f"{len(keys)} keys for {len(blobs)} images")
    return _decode(blobs, torch.device(device), range(len(blobs)), keys)


def _decode(
    blobs: Sequence[Any], device: torch.device, indices: Sequence[int], keys: Sequence[Any] | None
) -> list[torch.Tensor]:
    """:func:`decode_images`, with errors naming ``indices[i]`` and ``keys[i]`` (the caller's numbering)."""
    key_of = (lambda i: keys[i]) if keys is not None else (lambda i: None)
    out: list[torch.Tensor | None] = [None] * len(blobs)
    if device.type == "cuda":
        datas: dict[int, bytes | memoryview] = {}
        for i, blob in enumerate(blobs):
            try:
                data = _as_bytes(blob)
            except TypeError as exc:
                raise ImageDecodeError(indices[i], key_of(i), exc) from exc
            if bytes(data[:3]) == _JPEG_MAGIC:
                datas[i] = data
        gpu = _gpu_decode_jpegs(list(datas.values()), device)
        if gpu is not None:
            for i, t in zip(datas, gpu):
                if t is not None and t.ndim == 3 and t.shape[0] == 3 and t.shape[1] > 0 and t.shape[2] > 0:
                    out[i] = t
    for i, blob in enumerate(blobs):
        if out[i] is None:
            t = decode_image(blob, index=indices[i], key=key_of(i))
            out[i] = t if device.type == "cpu" else t.to(device, non_blocking=True)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# transform
# ----------------------------------------------------------------------------------------------------------------

_AFFINE_CACHE: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with ``(x / 255 - mean) / std == x * scale + shift``, shaped (3, 1, 1)."""
    k = (device, dtype)
    if k not in _AFFINE_CACHE:
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float64)
        std = torch.tensor(CLIP_STD, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).view(3, 1, 1)
        shift = (-mean / std).view(3, 1, 1)
        _AFFINE_CACHE[k] = (scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype))
    return _AFFINE_CACHE[k]


def _official_normalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ToTensor()`` then ``Normalize(CLIP_MEAN, CLIP_STD)`` on a uint8 (3, H, W) tensor, the same
    float32 operations in the same order: ``x.float().div(255)``, ``.sub(mean)``, ``.div(std)``."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return x.to(torch.float32).div(255).sub_(mean).div_(std)


def normalised_white(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The padding value per channel, (3, 1, 1): white (255) after CLIP normalisation, ``(1 - mean) / std``,
    computed with the official operations (so the padding is bit for bit the official one)."""
    white = _official_normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8, device=torch.device(device)))
    return white.to(dtype)


def _official_pixels(img: torch.Tensor, hd_num: int) -> torch.Tensor:
    """The official HD transform of a uint8 (3, H, W) CPU image, as uint8 (3, pad_h, pad_w): through Pillow,
    exactly :func:`mllm_pipeline.vision.hd.hd_transform` (the official ``HD_transform``)."""
    from mllm_pipeline.vision.hd import hd_transform

    arr = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
    return _pil_to_tensor(hd_transform(Image.fromarray(arr, "RGB"), hd_num)).contiguous()


def _resize(img: torch.Tensor, size: tuple[int, int], uint8_kernel: bool) -> torch.Tensor:
    """Bilinear antialiased resize of a (3, H, W) uint8 image to ``size`` = (h, w); uint8 or float result."""
    x = img.unsqueeze(0)
    if tuple(img.shape[1:]) == size:
        return img if uint8_kernel else img.float()  # Pillow's resize to the same size is the identity too
    if uint8_kernel:
        # torch's vectorised uint8 antialias kernel needs channels-last; Pillow-decoded images already are.
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.float()
    y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return y[0]


def hd_transform_tensor(
    img: torch.Tensor,
    hd_num: int,
    *,
    dtype: torch.dtype = torch.float32,
    uint8_resize: bool | None = None,
    resize: str | None = None,
) -> torch.Tensor:
    """HD-transform and CLIP-normalise one uint8 (3, H, W) image -> (3, rows*336, cols*336) tensor of ``dtype``.

    Same size as ``hd_target_size(W, H, hd_num)[1]`` and same padding placement as ``hd_transform``; the output
    is on the image's device. ``resize`` picks the path (module docstring): ``"pil"`` the official pixels (the
    default on the CPU), ``"uint8"`` torch's uint8 kernel (CPU), ``"float"`` the float kernel (the default
    elsewhere). ``uint8_resize`` True / False is the older spelling of ``"uint8"`` / ``"float"``.
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(img).__name__}")
    if img.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got {img.dtype}")
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(img.shape)}")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if not dtype.is_floating_point:
        raise TypeError(f"output dtype must be floating point, got {dtype}")
    _, h, w = img.shape
    (new_w, new_h), (pad_w, pad_h) = hd_target_size(int(w), int(h), hd_num)  # validates sizes and hd_num
    if resize is None:
        resize = ("uint8" if uint8_resize else "float") if uint8_resize is not None else \
            ("pil" if img.device.type == "cpu" else "float")
    if resize not in ("pil", "uint8", "float"):
        raise ValueError(f"resize must be 'pil', 'uint8' or 'float', got {resize!r}")
    if resize == "pil":
        if img.device.type != "cpu":
            raise ValueError("resize='pil' (the official pixels) runs on the CPU; the image is on " + str(img.device))
        return _official_normalize(_official_pixels(img, hd_num)).to(dtype)
    resized = _resize(img, (new_h, new_w), resize == "uint8")

    scale, shift = _affine(img.device, dtype)
    white = normalised_white(img.device, dtype)
    out = torch.empty((3, pad_h, pad_w), dtype=dtype, device=img.device)
    if w < h:  # portrait: the transposed landscape padding is left/right, the odd column on the right
        left = (pad_w - new_w) // 2
        region = out[:, :, left : left + new_w]
        out[:, :, :left] = white
        out[:, :, left + new_w :] = white
    else:  # landscape or square: top/bottom, the odd row at the bottom
        top = (pad_h - new_h) // 2
        region = out[:, top : top + new_h, :]
        out[:, :top, :] = white
        out[:, top + new_h :, :] = white
    region.copy_(resized)
    region.mul_(scale).add_(shift)
    return out


def hd_batch(
    images: Iterable[Any],
    hd_num: int,
    device: str | torch.device = "cpu",
    *,
    keys: Sequence[Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Decode (where given bytes) and HD-transform a batch -> list of normalised (3, rows*336, cols*336) tensors.

    ``images`` may mix encoded bytes (decoded with :func:`decode_images` on ``device``), uint8 (3, H, W) tensors
    (moved to ``device``) and PIL images. Sizes differ per image; see :func:`stack_padded` and
    :func:`group_by_size` to batch them.
    """
    device = torch.device(device)
    items = list(images)
    if keys is not None and len(keys) != len(items):
        raise ValueError(f"{len(keys)} keys for {len(items)} images")
    tensors: list[torch.Tensor | None] = [None] * len(items)
    blob_idx: list[int] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor) and item.ndim == 3:
            tensors[i] = item.to(device, non_blocking=True)
        elif isinstance(item, Image.Image):
            tensors[i] = _pil_to_tensor(item).to(device, non_blocking=True)
        else:
            blob_idx.append(i)
    if blob_idx:
        decoded = _decode(
            [items[i] for i in blob_idx], device, blob_idx, [keys[i] for i in blob_idx] if keys is not None else None
        )
        for i, t in zip(blob_idx, decoded):
            tensors[i] = t
    return [hd_transform_tensor(t, hd_num, dtype=dtype) for t in tensors]  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# batching and the model's views
# ----------------------------------------------------------------------------------------------------------------


def group_by_size(tensors: Sequence[torch.Tensor]) -> dict[tuple[int, int], tuple[list[int], torch.Tensor]]:
    """Group same-size HD tensors: ``{(H, W): (indices, stacked (n, 3, H, W))}``, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((int(t.shape[-2]), int(t.shape[-1])), []).append(i)
    return {hw: (idx, torch.stack([tensors[i] for i in idx])) for hw, idx in groups.items()}


def stack_padded(tensors: Sequence[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack differently sized (3, H, W) tensors into (n, 3, max H, max W), top-left aligned, the rest filled with
    ``value``; returns the batch and the per-image (H, W)."""
    if not tensors:
        raise ValueError("no tensors to stack")
    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
    mh = max(h for h, _ in sizes)
    mw = max(w for _, w in sizes)
    first = tensors[0]
    batch = torch.full((len(tensors), first.shape[0], mh, mw), value, dtype=first.dtype, device=first.device)
    for b, (t, (h, w)) in zip(batch, zip(tensors, sizes)):
        b[:, :h, :w].copy_(t)
    return batch, sizes


def global_view(hd: torch.Tensor, size: int = PATCH) -> torch.Tensor:
    """The model's global image: bicubic resize (no antialias, ``align_corners=False``, computed in float32 and
    cast back to the input dtype, as the 4KHD vision tower does) of the normalised padded HD tensor (3, H, W) or a
    same-size batch (n, 3, H, W) to ``size`` x ``size``."""
    x = hd if hd.ndim == 4 else hd.unsqueeze(0)
    y = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).to(hd.dtype)
    return y if hd.ndim == 4 else y[0]


def hd_crops(hd: torch.Tensor) -> torch.Tensor:
    """Split an HD tensor (3, rows*336, cols*336) into its (rows*cols, 3, 336, 336) crops, row-major."""
    c, h, w = hd.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"HD tensor sides must be multiples of {PATCH}, got {h}x{w}")
    rows, cols = h // PATCH, w // PATCH
    return hd.view(c, rows, PATCH, cols, PATCH).permute(1, 3, 0, 2, 4).reshape(rows * cols, c, PATCH, PATCH)

