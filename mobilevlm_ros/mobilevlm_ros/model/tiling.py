"""High-resolution frames as an overview plus tiles: MiniCPM-V's adaptive grid choice, on MobileVLM's fixed tiles.

MiniCPM-V ("adaptive visual encoding") picks how many slices an image gets from its area relative to the encoder's
resolution S (at most `max_slice_nums`), then among the grids with one slice fewer, as many, or one more, the grid
whose aspect ratio is closest to the image's in log space. `ensure_divide`, `find_best_resize` and `best_grid` are
its functions, reproduced exactly (default S = 448, patch 14).

MobileVLM cannot take slices of varying size: CLIP-L/336 has a fixed 24x24 position table and the LDP projector
needs a square grid. So here the same grid choice runs with S = the vision tower's image size and a `max_tiles`
budget, the frame is cut into that grid of cells that cover it exactly, and each cell goes through the model's own
preprocessing (padded to a square with the mean colour, resized to S), as the whole frame does for the overview.
"""

import math

from mobilevlm_ros.errors import ImageError

Size = tuple[int, int]  # (width, height) in pixels
Box = tuple[int, int, int, int]  # (left, top, right, bottom), PIL's crop box: right and bottom exclusive
Grid = tuple[int, int]  # (columns, rows)

MINICPMV_SCALE_RESOLUTION = 448
MINICPMV_PATCH_SIZE = 14
MINICPMV_MAX_SLICES = 9
DEFAULT_MAX_TILES = 6


def ensure_divide(length: float, patch_size: int) -> int:
    """`length` rounded to a multiple of `patch_size`, at least one patch."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int = MINICPMV_SCALE_RESOLUTION,
                     patch_size: int = MINICPMV_PATCH_SIZE, upscale: bool = False) -> Size:
    """The size with about scale_resolution^2 pixels and the aspect ratio of `size` (only shrinking unless
    `upscale`), each side a multiple of `patch_size`: MiniCPM-V's overview size, and with upscale a slice's size."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def best_grid(size: Size, scale_resolution: int = MINICPMV_SCALE_RESOLUTION, max_slices: int = MINICPMV_MAX_SLICES) -> Grid | None:
    """MiniCPM-V's grid for an image of `size`, or None when it fits in one view (area <= S^2, or a budget of 1).

    The slice count is ceil(area / S^2) capped at `max_slices`; the candidates are every factor pair of that count
    and its two neighbours (1 and counts over the cap left out); the lowest |log(W/H) - log(cols/rows)| wins, the
    first enumerated on a tie.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image is empty ({width}x{height})")
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slices)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_error = None, math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slices:
            continue
        for cols in range(1, count + 1):
            if count % cols == 0:
                error = abs(log_ratio - math.log(cols / (count // cols)))
                if error < best_error:
                    best, best_error = (cols, count // cols), error
    return best


def tile_boxes(size: Size, grid: Grid) -> list[Box]:
    """The cells of `grid` over an image of `size`, row by row: they cover every pixel exactly once, and cells
    differ in size by at most one pixel (the remainder of an uneven division is spread over them)."""
    width, height = size
    cols, rows = grid
    if not (1 <= cols <= width and 1 <= rows <= height):
        raise ImageError(f"a {cols}x{rows} grid does not fit a {width}x{height} image")
    xs = [round(i * width / cols) for i in range(cols + 1)]
    ys = [round(j * height / rows) for j in range(rows + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(rows) for i in range(cols)]


def tile_grid(size: Size, tile_size: int, max_tiles: int = DEFAULT_MAX_TILES) -> Grid:
    """Our grid: MiniCPM-V's choice with S = the vision tower's image size and `max_tiles` as the slice budget;
    (1, 1) when the image fits in one view."""
    if max_tiles < 1:
        raise ImageError(f"max_tiles must be at least 1, got {max_tiles}")
    return best_grid(size, tile_size, max_tiles) or (1, 1)


def roi_box(roi: tuple[int, int, int, int], size: Size) -> Box:
    """A region of interest (x, y, width, height) in pixels of an image of `size`, checked, as a crop box."""
    if len(roi) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in roi):
        raise ImageError(f"region of interest must be 4 integers (x, y, width, height), got {roi!r}")
    x, y, w, h = roi
    described = f"region of interest (x={x}, y={y}, width={w}, height={h})"
    if w <= 0 or h <= 0:
        raise ImageError(f"{described} is empty")
    if x < 0 or y < 0 or x + w > size[0] or y + h > size[1]:
        raise ImageError(f"{described} reaches outside the {size[0]}x{size[1]} frame")
    return x, y, x + w, y + h
