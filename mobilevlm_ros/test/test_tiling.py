"""The grid choice reproduces MiniCPM-V's; our tiles of the vision tower's size cover a frame exactly; ROIs are checked."""

import numpy as np
import pytest
from PIL import Image

from mobilevlm_ros.errors import ImageError
from mobilevlm_ros.model.tiling import best_grid, ensure_divide, find_best_resize, roi_box, tile_boxes, tile_grid


@pytest.mark.parametrize("size, grid", [((1920, 1080), (4, 2)), ((1280, 720), (3, 2)), ((640, 480), (2, 1))])
def test_minicpmv_worked_examples_at_448(size, grid):
    assert best_grid(size, 448, 9) == grid


@pytest.mark.parametrize("size, max_slices, grid", [
    ((448, 448), 9, None),  # one view holds it
    ((300, 200), 9, None),
    ((1920, 1080), 1, None),  # a budget of one slice: no slicing
    ((1920, 1080), 4, (3, 1)),  # count min(ceil(10.3), 4) = 4: candidates 3 and 4; 3x1 is closest to 16:9
    ((1080, 1920), 9, (2, 4)),  # portrait: rows and columns swap
    ((1000, 1000), 9, (2, 2)),  # 4.98 -> 5 slices; candidates 4, 5, 6: only 2x2 is square
    ((4000, 500), 9, (8, 1)),  # exactly 8:1: 8x1 (error 0) beats 9x1 from the full budget
])
def test_minicpmv_grid_slice_budget_and_aspect(size, max_slices, grid):
    assert best_grid(size, 448, max_slices) == grid


@pytest.mark.parametrize("length, divided", [(0, 14), (10, 14), (20, 14), (21, 28), (35, 28), (49, 56), (597, 602), (336, 336)])
def test_ensure_divide_rounds_to_the_patch_like_python_round(length, divided):
    assert ensure_divide(length, 14) == divided  # 21/14 = 1.5 -> 2, 35/14 = 2.5 -> 2 (round half to even), at least 14


@pytest.mark.parametrize("size, upscale, best", [
    ((1920, 1080), False, (602, 336)),  # h = int(448 / sqrt(16/9)) = 336, w = int(336 * 16/9) = 597 -> 602
    ((640, 480), False, (518, 392)),  # h = int(387.98) = 387 -> 392, w = int(516.0) = 516 -> 518
    ((300, 200), False, (294, 196)),  # smaller than 448^2: only rounded to patches
    ((300, 200), True, (546, 364)),  # upscaled: h = int(365.8) = 365 -> 364, w = int(547.5) = 547 -> 546
])
def test_find_best_resize(size, upscale, best):
    assert find_best_resize(size, 448, 14, upscale=upscale) == best


@pytest.mark.parametrize("size, max_tiles, grid", [
    ((1920, 1080), 6, (3, 2)),  # 18.4 tile areas, budget 6: candidates 5 and 6; 3x2 cells of 640x540
    ((1280, 720), 6, (3, 2)),
    ((640, 480), 6, (2, 2)),  # 2.7 -> 3: candidates 2, 3, 4; 2x2 beats 2x1 for 4:3
    ((640, 360), 6, (2, 1)),
    ((1080, 1920), 6, (2, 3)),
    ((336, 336), 6, (1, 1)),  # fits one tile
    ((1920, 1080), 2, (2, 1)),
    ((1920, 1080), 1, (1, 1)),
])
def test_our_grid_over_tiles_of_the_tower_size(size, max_tiles, grid):
    assert tile_grid(size, 336, max_tiles) == grid


def test_tile_budget_must_be_positive():
    with pytest.raises(ImageError, match="max_tiles must be at least 1, got 0"):
        tile_grid((1920, 1080), 336, 0)


@pytest.mark.parametrize("size, grid", [
    ((1920, 1080), (3, 2)), ((1921, 1079), (3, 2)), ((100, 37), (7, 5)), ((5, 5), (5, 5)), ((640, 480), (1, 1)),
])
def test_tiles_cover_every_pixel_exactly_once(size, grid):
    width, height = size
    boxes = tile_boxes(size, grid)
    assert len(boxes) == grid[0] * grid[1]
    covered = np.zeros((height, width), dtype=np.int32)
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        covered[top:bottom, left:right] += 1
    assert (covered == 1).all()
    widths = {right - left for left, _, right, _ in boxes}
    heights = {bottom - top for _, top, _, bottom in boxes}
    assert max(widths) - min(widths) <= 1 and max(heights) - min(heights) <= 1
    assert [box[:2] for box in boxes] == sorted((box[:2] for box in boxes), key=lambda xy: (xy[1], xy[0]))  # row-major


def test_tiles_pasted_back_are_the_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1079, 1921, 3), dtype=np.uint8))
    rebuilt = Image.new("RGB", image.size)
    for box in tile_boxes(image.size, tile_grid(image.size, 336, 6)):
        rebuilt.paste(image.crop(box), box[:2])
    assert np.array_equal(np.asarray(rebuilt), np.asarray(image))


def test_grid_larger_than_the_image_is_refused():
    with pytest.raises(ImageError, match="a 3x1 grid does not fit a 2x2 image"):
        tile_boxes((2, 2), (3, 1))


def test_roi_box():
    assert roi_box((10, 20, 30, 40), (640, 480)) == (10, 20, 40, 60)
    assert roi_box((0, 0, 640, 480), (640, 480)) == (0, 0, 640, 480)


@pytest.mark.parametrize("roi, error", [
    ((10, 20, 0, 40), "region of interest (x=10, y=20, width=0, height=40) is empty"),
    ((600, 20, 41, 40), "region of interest (x=600, y=20, width=41, height=40) reaches outside the 640x480 frame"),
    ((-1, 0, 10, 10), "reaches outside the 640x480 frame"),
    ((0, 470, 10, 11), "reaches outside the 640x480 frame"),
    ((0.5, 0, 10, 10), "must be 4 integers (x, y, width, height), got (0.5, 0, 10, 10)"),
    ((0, 0, 10), "must be 4 integers"),
])
def test_bad_roi_is_a_clear_error(roi, error):
    with pytest.raises(ImageError) as raised:
        roi_box(roi, (640, 480))
    assert error in str(raised.value)
