"""Preprocessing equals upstream's: pad to square with int(mean*255), bicubic resize with PIL, normalize."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mobilevlm_ros.errors import ImageError
from mobilevlm_ros.model.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, load_image_file

MEAN = np.array(OPENAI_CLIP_MEAN)
STD = np.array(OPENAI_CLIP_STD)


def normalized(rgb) -> np.ndarray:
    return (np.array(rgb) / 255 - MEAN) / STD


def test_hand_computed_non_square_image():
    """A 100x50 uniform image: rows 25..74 of the padded square hold it; the bicubic kernel touches +-2 source rows."""
    image = np.zeros((50, 100, 3), np.uint8)
    image[:] = (10, 200, 30)
    pixels = ImageProcessor()(image).numpy()
    assert pixels.shape == (3, 336, 336)
    scale = 336 / 100
    pad_rows = [0, 40, int(25 * scale) - 8, int(75 * scale) + 8, 335]
    image_rows = [int(25 * scale) + 8, 168, int(75 * scale) - 8]
    for row in pad_rows:
        np.testing.assert_allclose(pixels[:, row, :].T, np.tile(normalized((122, 116, 104)), (336, 1)), atol=1e-6)
    for row in image_rows:
        np.testing.assert_allclose(pixels[:, row, :].T, np.tile(normalized((10, 200, 30)), (336, 1)), atol=1e-6)


def test_pad_colour_is_the_truncated_clip_mean():
    assert ImageProcessor().pad_color == (122, 116, 104)


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Upstream's padding, written out again here."""
    width, height = image.size
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (336, 336), (1000, 37)])
def test_matches_transformers_pil_clip_processor_after_upstream_padding(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    expected = reference(expand2square(image, (122, 116, 104)), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ImageProcessor()(image), expected, atol=1e-5, rtol=0)


def test_bgr_input_equals_the_same_image_in_rgb(camera_image):
    processor = ImageProcessor()
    torch.testing.assert_close(processor(camera_image[:, :, ::-1].copy(), "bgr"), processor(camera_image))


def test_pil_input_equals_numpy_input(camera_image):
    processor = ImageProcessor()
    torch.testing.assert_close(processor(Image.fromarray(camera_image)), processor(camera_image))


def test_no_padding_when_the_checkpoint_does_not_ask_for_it(camera_image):
    padded, cropped = ImageProcessor()(camera_image), ImageProcessor(pad_to_square=False)(camera_image)
    assert cropped.shape == padded.shape and not torch.allclose(cropped, padded)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 10, 3), np.uint8), r"image is empty \(10x0\)"),
        (np.zeros((10, 0, 3), np.uint8), r"image is empty \(0x10\)"),
        (np.zeros((10, 10), np.uint8), r"expected an HxWx3 array, got shape \(10, 10\)"),
        (np.zeros((10, 10, 4), np.uint8), r"expected an HxWx3 array, got shape \(10, 10, 4\)"),
        (np.zeros((10, 10, 3), np.float32), "expected uint8 pixels, got float32"),
        ("not an image", "expected a numpy array or PIL image, got str"),
    ],
)
def test_bad_images_are_specific_errors(image, message):
    with pytest.raises(ImageError, match=message):
        ImageProcessor()(image)


def test_unknown_channel_order():
    with pytest.raises(ImageError, match="unknown channel order 'yuv'"):
        ImageProcessor()(np.zeros((4, 4, 3), np.uint8), "yuv")


def test_truncated_image_file(tmp_path, camera_image):
    path = tmp_path / "frame.png"
    Image.fromarray(camera_image).save(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ImageError, match="frame.png: cannot read image"):
        load_image_file(path)
