"""Image preprocessing exactly as upstream MobileVLM: pad to a square with the mean colour, CLIP resize/crop, normalize.

Upstream (transformers 4.33's CLIPImageProcessor) resizes a uint8 PIL image with bicubic filtering; doing the same with
PIL here reproduces its pixels exactly (torchvision's resize differs by up to 0.015).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
from PIL import Image

from mobilevlm_ros.errors import ImageError

ImageInput = Union[np.ndarray, Image.Image]
ChannelOrder = Literal["rgb", "bgr"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"

# Resampling filters: Image.Resampling is Pillow >= 9.1; older Pillows (Ubuntu 22.04's 9.0.1) have the same values as
# module constants, which 9.1-9.3 deprecate. This works on both, without the warning.
RESAMPLING = getattr(Image, "Resampling", Image)


@dataclass(frozen=True)
class ImageProcessor:
    """CLIP preprocessing settings; `pad_to_square` is the checkpoint's `image_aspect_ratio: pad`."""

    crop_size: int = 336
    shortest_edge: int = 336
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    pad_to_square: bool = True

    @classmethod
    def from_tower_dir(cls, tower_dir: Path | None, image_size: int, pad_to_square: bool) -> "ImageProcessor":
        """Settings from the tower directory's preprocessor_config.json (as upstream), else CLIP's at `image_size`."""
        path = tower_dir / PREPROCESSOR_FILE if tower_dir is not None else None
        if path is None or not path.is_file():
            return cls(crop_size=image_size, shortest_edge=image_size, pad_to_square=pad_to_square)
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            crop = fields.get("crop_size", image_size)
            size = fields.get("size", image_size)
            return cls(
                crop_size=int(crop["height"] if isinstance(crop, dict) else crop),
                shortest_edge=int(size["shortest_edge"] if isinstance(size, dict) else size),
                image_mean=tuple(float(v) for v in fields.get("image_mean", OPENAI_CLIP_MEAN)),
                image_std=tuple(float(v) for v in fields.get("image_std", OPENAI_CLIP_STD)),
                rescale_factor=float(fields.get("rescale_factor", 1 / 255)),
                pad_to_square=pad_to_square,
            )
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ImageError(f"{path}: unreadable preprocessor settings ({error})") from error

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Upstream pads with `int(mean * 255)` (truncated): (122, 116, 104) for CLIP."""
        return tuple(int(channel * 255) for channel in self.image_mean)

    def __call__(self, image: ImageInput, channel_order: ChannelOrder = "rgb") -> torch.Tensor:
        """One image -> pixel_values [3, crop_size, crop_size] float32."""
        return self.normalize(np.asarray(self.square(image, channel_order)))

    def batch(self, images: Sequence[ImageInput], channel_order: ChannelOrder = "rgb") -> torch.Tensor:
        """Several images (an overview and its tiles) -> pixel_values [B, 3, crop_size, crop_size], for one vision call."""
        return self.normalize(np.stack([np.asarray(self.square(image, channel_order)) for image in images]))

    def square(self, image: ImageInput, channel_order: ChannelOrder = "rgb") -> Image.Image:
        """The crop_size x crop_size RGB image the model sees, before normalization (padded, resized, cropped)."""
        pil = to_pil_rgb(image, channel_order)
        if self.pad_to_square:
            pil = expand_to_square(pil, self.pad_color)
        pil = resize_shortest_edge(pil, self.shortest_edge)
        return center_crop(pil, self.crop_size)

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [..., H, W, 3] -> float32 pixel_values [..., 3, H, W] (rescaled, mean and std applied)."""
        values = pixels.astype(np.float32) * self.rescale_factor
        values = (values - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(values, -1, -3)))


def to_pil_rgb(image: ImageInput, channel_order: ChannelOrder = "rgb") -> Image.Image:
    """An RGB PIL image from PIL (any mode) or a numpy HxWx3 uint8 array in `channel_order`."""
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ImageError(f"image is empty ({image.width}x{image.height})")
        return image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected a numpy array or PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"expected an HxWx3 array, got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"image is empty ({image.shape[1]}x{image.shape[0]})")
    if image.dtype != np.uint8:
        raise ImageError(f"expected uint8 pixels, got {image.dtype}")
    if channel_order == "bgr":
        image = image[:, :, ::-1]
    elif channel_order != "rgb":
        raise ImageError(f"unknown channel order {channel_order!r} (expected 'rgb' or 'bgr')")
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad the short side equally (the extra pixel goes after) so the image is centred on a square."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is `size`, keeping the aspect ratio (long side truncated, as transformers does)."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size == image.size:
        return image
    return image.resize(new_size, RESAMPLING.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image_file(path: str | Path) -> Image.Image:
    """Decode an image file fully (so a truncated file fails here, not later) as RGB."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"{path}: cannot read image ({error})") from error
