"""hd_transform and hd_token_count against the InternLM-XComposer2-4KHD rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mllm_pipeline.vision.hd import hd_grid, hd_token_count, hd_transform


def _img(w, h, color=(10, 120, 200)):
    return Image.new("RGB", (w, h), color)


@pytest.mark.parametrize("hd_num,expected", [(9, 1561), (16, 2653), (25, 4057), (55, 8737)])
def test_paper_maxima(hd_num, expected):
    # the maximum over all aspect ratios is the tallest image: one column of hd_num rows
    sizes = [(w, 1000) for w in range(20, 1001, 20)] + [(1000, h) for h in range(20, 1001, 20)] + [(5, 5000), (5000, 5)]
    assert max(hd_token_count(w, h, hd_num) for w, h in sizes) == expected
    assert hd_token_count(5, 5000, hd_num) == expected


@pytest.mark.parametrize(
    "size,hd_num,out_size,grid",
    [
        ((1000, 500), 9, (1344, 672), (2, 4)),  # landscape 2:1 -> scale 4 (4*ceil(4/2)=8 <= 9)
        ((500, 1000), 9, (672, 1344), (4, 2)),  # portrait: transposed, processed, transposed back
        ((800, 800), 16, (1344, 1344), (4, 4)),  # square
        ((800, 800), 9, (1008, 1008), (3, 3)),
        ((32, 24), 25, (1680, 1344), (4, 5)),  # tiny images are upscaled to the grid
        ((4000, 100), 16, (5376, 336), (1, 16)),  # very wide: one row
        ((100, 4000), 16, (336, 5376), (16, 1)),  # very tall: one column
    ],
)
def test_sizes_and_grids(size, hd_num, out_size, grid):
    out = hd_transform(_img(*size), hd_num)
    assert out.size == out_size
    assert hd_grid(*size, hd_num) == grid
    rows, cols = grid
    assert hd_token_count(*size, hd_num) == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12


def test_resize_is_bilinear_and_padding_is_white_centred_with_the_odd_pixel_at_the_bottom():
    src = _img(1000, 333)  # ratio 3.003; hd_num 1 -> 336 x int(336/3.003)=111, padded to 336: 112 above, 113 below
    out = np.asarray(hd_transform(src, 1))
    assert out.shape == (336, 336, 3)
    content = np.where((out != 255).any(axis=(1, 2)))[0]
    assert (content.min(), content.max()) == (112, 222)
    assert (out[:112] == 255).all() and (out[223:] == 255).all()


def test_portrait_padding_goes_left_and_right_with_the_odd_pixel_on_the_right():
    out = np.asarray(hd_transform(_img(333, 1000), 1))
    content = np.where((out != 255).any(axis=(0, 2)))[0]
    assert (content.min(), content.max()) == (112, 222)


def test_portrait_is_the_transpose_of_landscape():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (300, 700, 3), dtype=np.uint8)
    land = np.asarray(hd_transform(Image.fromarray(arr), 9))
    port = np.asarray(hd_transform(Image.fromarray(arr.transpose(1, 0, 2).copy()), 9))
    assert np.array_equal(land, port.transpose(1, 0, 2))


def test_portrait_grid_follows_the_landscape_rule():
    # Without the transpose a 1:4 portrait image has ratio 0.25: scale*ceil(scale*4) <= 16 gives 2 columns and a
    # resize to 672 x int(672/0.25)=2688 (8 rows): the same grid here by coincidence of the 1:4 ratio, but the
    # faithful transform gets there through the landscape rule (ratio 4 -> scale 8 -> 8 rows x 2 columns).
    rows, cols = hd_grid(250, 1000, 16)
    assert (rows, cols) == (8, 2)  # transposed: ratio 4 -> scale 8 (8*ceil(8/4)=16), back to 8 rows x 2 cols
    assert hd_transform(_img(250, 1000), 16).size == (672, 2688)


@pytest.mark.parametrize("size", [(1, 1), (1, 20000), (20000, 1), (3, 1)])
def test_extreme_aspect_ratios_do_not_crash(size):
    out = hd_transform(_img(*size), 25)
    assert out.width % 336 == 0 and out.height % 336 == 0
    rows, cols = hd_grid(*size, 25)
    assert (out.height // 336, out.width // 336) == (rows, cols) and rows * cols <= 25


def test_zero_size_is_a_clear_error():
    with pytest.raises(ValueError, match="positive size"):
        hd_token_count(0, 10, 9)
