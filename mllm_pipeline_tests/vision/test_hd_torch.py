"""The batched tensor HD transform against the PIL reference (``hd_transform`` + ToTensor + CLIP Normalize)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mllm_pipeline.vision.hd import hd_grid, hd_target_size, hd_transform
from mllm_pipeline.vision.hd_torch import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    decode_image,
    decode_images,
    global_view,
    group_by_size,
    hd_batch,
    hd_crops,
    hd_transform_tensor,
    normalised_white,
    stack_padded,
)

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: smooth colour fields plus sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 37 + c) * np.cos(yy / 53 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _to_255(t: torch.Tensor) -> torch.Tensor:
    """Undo the CLIP normalisation: back to 0..255 units, float64."""
    return (t.double().cpu() * STD.double() + MEAN.double()) * 255.0


def _pil_reference(arr: np.ndarray, hd_num: int) -> torch.Tensor:
    """The PIL path, (3, H, W) float64 in 0..255: hd_transform then ToTensor (before normalisation)."""
    return torch.from_numpy(np.asarray(hd_transform(Image.fromarray(arr), hd_num)).astype(np.float64)).permute(2, 0, 1)


def _encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


SIZES = [
    (640, 480),  # landscape
    (480, 640),  # portrait
    (500, 500),  # square
    (1000, 333),  # odd padding
    (333, 1000),
    (1, 1),  # tiny
    (3, 500),
    (500, 3),
    (5000, 10),  # extreme
    (10, 5000),
]


# ---------------------------------------------------------------------------------------------------------------
# sizes and padding
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hd_num", [1, 9, 16, 25, 55])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_output_size_is_hd_target_size_and_hd_transform_size(size, hd_num):
    w, h = size
    img = torch.full((3, h, w), 40, dtype=torch.uint8)
    out = hd_transform_tensor(img, hd_num)
    _, (pad_w, pad_h) = hd_target_size(w, h, hd_num)
    assert out.shape == (3, pad_h, pad_w)
    assert out.dtype == torch.float32 and out.is_contiguous()
    rows, cols = hd_grid(w, h, hd_num)
    assert (pad_h, pad_w) == (rows * 336, cols * 336)
    assert hd_transform(Image.new("RGB", size, (40, 40, 40)), hd_num).size == (pad_w, pad_h)


@pytest.mark.parametrize("hd_num", [1, 9, 25])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_float_resize_path_has_the_same_sizes(size, hd_num):
    # the float resize is what runs on the GPU; exercise it here on the CPU
    w, h = size
    out = hd_transform_tensor(torch.full((3, h, w), 40, dtype=torch.uint8), hd_num, uint8_resize=False)
    _, (pad_w, pad_h) = hd_target_size(w, h, hd_num)
    assert out.shape == (3, pad_h, pad_w)


@pytest.mark.parametrize("uint8_resize", [True, False])
@pytest.mark.parametrize(
    "size,hd_num",
    [((1000, 333), 1), ((333, 1000), 1), ((1000, 500), 9), ((500, 1000), 9), ((700, 301), 16), ((301, 700), 16),
     ((5000, 10), 9), ((10, 5000), 9), ((3, 500), 9)],
)
def test_padding_is_white_where_pil_puts_it(size, hd_num, uint8_resize):
    w, h = size
    arr = np.full((h, w, 3), 30, dtype=np.uint8)  # dark: no content pixel is white
    ours = hd_transform_tensor(_chw(arr), hd_num, uint8_resize=uint8_resize)
    ref_white = torch.from_numpy((np.asarray(hd_transform(Image.fromarray(arr), hd_num)) == 255).all(axis=2))
    # padding pixels are exactly normalised white (255 before normalisation), at exactly PIL's pixels
    ours_white = (ours == normalised_white()).all(dim=0)
    assert torch.equal(ours_white, ref_white)
    assert not ((ours - normalised_white()).abs() < 0.01).all(dim=0)[~ours_white].any()


def test_odd_padding_row_goes_to_the_bottom_and_odd_column_to_the_right():
    # 1000x333, hd 1: 336 x int(336/3.003)=111, padded to 336: 112 rows above, 113 below (as hd_transform)
    land = hd_transform_tensor(torch.full((3, 333, 1000), 0, dtype=torch.uint8), 1)
    content_rows = np.where((_to_255(land) < 128).any(dim=0).any(dim=1).numpy())[0]
    assert (content_rows.min(), content_rows.max()) == (112, 222)
    port = hd_transform_tensor(torch.full((3, 1000, 333), 0, dtype=torch.uint8), 1)
    content_cols = np.where((_to_255(port) < 128).any(dim=0).any(dim=0).numpy())[0]
    assert (content_cols.min(), content_cols.max()) == (112, 222)


# ---------------------------------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------------------------------

CLOSENESS_CASES = [
    ((1000, 500), 9),  # upscale x1.34
    ((3000, 1000), 9),  # downscale by 2.2
    ((1000, 3000), 9),  # portrait downscale
    ((640, 480), 16),  # upscale in both directions
    ((333, 1000), 1),  # portrait, odd padding
    ((37, 23), 25),  # tiny, large upscale
    ((2000, 40), 9),  # extreme aspect ratio
]


@pytest.mark.parametrize("uint8_resize", [True, False], ids=["uint8-kernel", "float-kernel"])
@pytest.mark.parametrize("size,hd_num", CLOSENESS_CASES)
def test_pixels_are_close_to_the_pil_path(size, hd_num, uint8_resize):
    """Mean absolute difference from hd_transform (0..255 units). Measured: uint8 kernel 0.0003-0.24 (rounding
    only; portraits are resized in the other pass order than PIL's transpose), float kernel 0.09-0.31 (the float
    result is not rounded to integers); max 2 for both."""
    w, h = size
    arr = _photo(w, h)
    ours = _to_255(hd_transform_tensor(_chw(arr), hd_num, uint8_resize=uint8_resize))
    ref = _pil_reference(arr, hd_num)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs()
    assert float(diff.mean()) < 0.5
    assert float(diff.max()) <= 2.5


@pytest.mark.parametrize("uint8_resize", [True, False])
def test_portrait_is_the_transpose_of_landscape(uint8_resize):
    arr = _photo(700, 300, seed=1)
    land = hd_transform_tensor(_chw(arr), 9, uint8_resize=uint8_resize)
    port = hd_transform_tensor(_chw(arr.transpose(1, 0, 2)), 9, uint8_resize=uint8_resize)
    assert port.shape == land.transpose(1, 2).shape
    diff = _to_255(port) - _to_255(land.transpose(1, 2))
    # float: the same separable filter in the other pass order; uint8: plus the intermediate rounding
    assert float(diff.abs().max()) <= (1.01 if uint8_resize else 1e-3)


def test_normalisation_constants_and_formula():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    # an image already at its target size is not resampled: the output is exactly (x/255 - mean)/std
    arr = _photo(336, 336, seed=2)
    out = hd_transform_tensor(_chw(arr), 1)
    expected = (_chw(arr).float() / 255 - MEAN) / STD
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(normalised_white(), (1 - MEAN) / STD, rtol=0, atol=2e-6)


def test_output_dtype_option():
    out = hd_transform_tensor(_chw(_photo(300, 200)), 9, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 672, 1008)
    with pytest.raises(TypeError):
        hd_transform_tensor(_chw(_photo(30, 20)), 9, dtype=torch.uint8)


def test_input_validation():
    with pytest.raises(TypeError):
        hd_transform_tensor(torch.zeros(3, 10, 10), 9)  # float input
    with pytest.raises(ValueError):
        hd_transform_tensor(torch.zeros(4, 10, 10, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        hd_transform_tensor(torch.zeros(3, 0, 10, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        hd_transform_tensor(torch.zeros(3, 10, 10, dtype=torch.uint8), 0)
    grey = hd_transform_tensor(torch.full((1, 20, 30), 7, dtype=torch.uint8), 1)
    torch.testing.assert_close(grey, hd_transform_tensor(torch.full((3, 20, 30), 7, dtype=torch.uint8), 1))


# ---------------------------------------------------------------------------------------------------------------
# decode and batch
# ---------------------------------------------------------------------------------------------------------------


def test_decode_matches_pil_for_common_formats():
    arr = _photo(64, 48)
    for blob in (_encode(arr), _encode(arr, "PNG"), _encode(arr, "PNG", "L"), _encode(arr, "PNG", "RGBA"),
                 _encode(arr, "PNG", "P"), _encode(arr, "WEBP")):
        t = decode_image(blob)
        ref = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        assert t.dtype == torch.uint8 and t.shape == (3, 48, 64)
        assert np.array_equal(t.permute(1, 2, 0).numpy(), ref)
    # the decoded tensor owns writable memory
    t = decode_image(_encode(arr))
    t[:, 0, 0] = 0


def test_decode_errors_name_the_index_and_key():
    good = _encode(_photo(16, 16))
    with pytest.raises(ImageDecodeError, match=r"image 1 \(key 'b'\)") as err:
        decode_images([good, b"not an image", good], keys=["a", "b", "c"])
    assert err.value.index == 1 and err.value.key == "b"
    with pytest.raises(ImageDecodeError, match="image 0"):
        decode_images([b""])
    with pytest.raises(ImageDecodeError, match="image 0"):
        decode_images([good[: len(good) // 2]])  # truncated JPEG
    with pytest.raises(ImageDecodeError, match="TypeError"):
        decode_images([12345])
    with pytest.raises(ValueError, match="keys"):
        decode_images([good], keys=["a", "b"])
    # hd_batch numbers images by their place in its own input, tensors included
    with pytest.raises(ImageDecodeError, match=r"image 2 \(key 'k2'\)"):
        hd_batch([torch.zeros(3, 4, 4, dtype=torch.uint8), good, b"\xff\xd8\xffjunk"], 9, keys=["k0", "k1", "k2"])


def test_hd_batch_mixes_bytes_tensors_and_pil_images():
    arrs = [_photo(300, 200, 1), _photo(200, 300, 2), _photo(50, 50, 3)]
    blob = _encode(arrs[0], "PNG")  # lossless, so the three inputs are the same pixels
    outs = hd_batch([blob, _chw(arrs[1]), Image.fromarray(arrs[2])], 9)
    assert [tuple(o.shape) for o in outs] == [(3, 672, 1008), (3, 1008, 672), (3, 1008, 1008)]
    for arr, out in zip(arrs, outs):
        torch.testing.assert_close(out, hd_transform_tensor(_chw(arr), 9))


def test_group_by_size_and_stack_padded():
    outs = [torch.randn(3, 336, 672), torch.randn(3, 672, 336), torch.randn(3, 336, 672)]
    groups = group_by_size(outs)
    assert list(groups) == [(336, 672), (672, 336)]
    idx, stacked = groups[(336, 672)]
    assert idx == [0, 2] and stacked.shape == (2, 3, 336, 672)
    assert torch.equal(stacked[1], outs[2])
    batch, sizes = stack_padded(outs)
    assert batch.shape == (3, 3, 672, 672) and sizes == [(336, 672), (672, 336), (336, 672)]
    assert torch.equal(batch[1, :, :672, :336], outs[1]) and (batch[1, :, :, 336:] == 0).all()
    with pytest.raises(ValueError):
        stack_padded([])


def test_global_view_and_crops_follow_the_model():
    hd = hd_transform_tensor(_chw(_photo(900, 400)), 9)  # 2 rows x 4 cols (ratio 2.25 -> scale 4)
    assert hd.shape == (3, 672, 1344)
    g = global_view(hd)
    assert g.shape == (3, 336, 336)
    torch.testing.assert_close(g, F.interpolate(hd[None], size=(336, 336), mode="bicubic")[0])
    assert global_view(hd[None].expand(2, -1, -1, -1)).shape == (2, 3, 336, 336)
    assert global_view(hd.to(torch.bfloat16)).dtype == torch.bfloat16
    crops = hd_crops(hd)
    assert crops.shape == (8, 3, 336, 336)
    assert torch.equal(crops[5], hd[:, 336:672, 336:672])  # row 1, column 1: row-major
    with pytest.raises(ValueError):
        hd_crops(torch.zeros(3, 300, 336))


# ---------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------------


@cuda
def test_gpu_path_has_the_same_sizes_and_close_pixels():
    arrs = [_photo(640, 480, 1), _photo(300, 900, 2), _photo(7, 3, 3)]
    blobs = [_encode(arrs[0]), _encode(arrs[1], "PNG"), _encode(arrs[2])]
    for hd_num in (1, 9, 25):
        cpu = hd_batch(blobs, hd_num)
        gpu = hd_batch(blobs, hd_num, device="cuda")
        for c, g in zip(cpu, gpu):
            assert g.device.type == "cuda" and g.shape == c.shape
            # nvJPEG's IDCT/upsampling may differ from libjpeg's by a level or two, plus the float resize
            assert float((_to_255(g) - _to_255(c)).abs().mean()) < 2.0


@cuda
def test_gpu_decode_errors_name_the_index():
    good = _encode(_photo(16, 16))
    with pytest.raises(ImageDecodeError, match="image 1"):
        decode_images([good, b"\xff\xd8\xffbroken"], device="cuda")


# ---------------------------------------------------------------------------------------------------------------
# the official pixels (transcription in official_hd.py, source named there)
# ---------------------------------------------------------------------------------------------------------------


OFFICIAL_SIZES = [(640, 480), (480, 640), (500, 500), (1000, 333), (333, 1000), (1, 1), (3, 500), (5000, 10),
                  (10, 5000), (1000, 3000), (37, 23)]


@pytest.mark.parametrize("hd_num", [1, 9, 25])
@pytest.mark.parametrize("size", OFFICIAL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_cpu_path_gives_the_official_pixels_bit_for_bit(size, hd_num):
    """What the loaders feed on the CPU (``hd_batch`` of encoded bytes, ``hd_transform_tensor`` of decoded uint8)
    equals the official ImageProcessorHD output exactly, padding included."""
    from mllm_pipeline_tests.vision.official_hd import official_tensor, official_tensor_from_bytes

    w, h = size
    arr = _photo(w, h, seed=w + h)
    try:
        want = official_tensor(Image.fromarray(arr), hd_num)
    except ValueError:  # the official code resizes the short side to int(336 * scale / ratio) = 0 pixels and fails;
        (rw, rh), _ = hd_target_size(w, h, hd_num)  # hd_transform clamps it to 1 (documented in vision/hd.py)
        assert min(rw, rh) == 1
        return
    got = hd_transform_tensor(_chw(arr), hd_num)
    assert got.shape == want.shape and torch.equal(got, want), float((got - want).abs().max())
    for fmt in ("PNG", "JPEG"):
        blob = _encode(arr, fmt)
        (batch,) = hd_batch([blob], hd_num)
        assert torch.equal(batch, official_tensor_from_bytes(blob, hd_num)), fmt


def test_the_fast_kernels_are_not_the_official_pixels():
    """Why the CPU default is Pillow: torch's uint8 kernel rounds differently (up to 2/255)."""
    from mllm_pipeline_tests.vision.official_hd import official_tensor

    arr = _photo(1000, 3000, seed=5)
    want = official_tensor(Image.fromarray(arr), 9)
    fast = hd_transform_tensor(_chw(arr), 9, resize="uint8")
    assert not torch.equal(fast, want) and float((_to_255(fast) - _to_255(want)).abs().max()) <= 2.5
