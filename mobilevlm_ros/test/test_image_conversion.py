"""ROS image messages to RGB frames and back: every encoding, row padding, endianness, compressed data, hostile input.

The message bytes are built here independently of the module (numpy channel shuffles; OpenCV's RGB -> YUV encoders for
the 4:2:2 formats, whose byte order is also pinned down by hand-written pixels; Bayer mosaics sampled by hand from the
pattern's name).
"""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from mobilevlm_ros.errors import ImageError
from mobilevlm_ros.ros.image_conversion import (
    MAX_PIXELS,
    MAX_SIDE,
    SUPPORTED_ENCODINGS,
    compressed_to_rgb,
    image_to_rgb,
    rgb_to_compressed,
    rgb_to_image,
)

HEIGHT, WIDTH = 24, 32  # non-square, so a swapped width/height shows
PADDING_BYTE = 0xAB  # fills row padding; it must never show up in a frame
# Each Bayer encoding's 2x2 cell, row by row.
BAYER = {"bayer_rggb8": "RGGB", "bayer_bggr8": "BGGR", "bayer_gbrg8": "GBRG", "bayer_grbg8": "GRBG"}


def _random_frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _mosaic(frame: np.ndarray, pattern: str) -> np.ndarray:
    """The H x W x 1 Bayer mosaic of an RGB frame: each pixel keeps the channel its place in the 2x2 cell names."""
    channel = np.empty(frame.shape[:2], dtype=np.intp)
    for index, colour in enumerate(pattern):
        channel[index // 2 :: 2, index % 2 :: 2] = "RGB".index(colour)
    return np.take_along_axis(frame, channel[..., None], axis=2)


def _encode(encoding: str, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(H x W x bytes-per-pixel message pixels, expected RGB result, tolerance) for `frame` in `encoding`. Bayer
    encodings get one colour instead of the frame: demosaicing gives a uniform frame back exactly, a random one only
    where each pixel was sampled (test_bayer_keeps_each_pixels_own_sample)."""
    alpha = np.random.default_rng(1).integers(0, 256, frame.shape[:2] + (1,), dtype=np.uint8)
    gray = frame[..., :1]
    if encoding in BAYER:
        solid = np.empty_like(frame)
        solid[...] = (200, 100, 50)
        return _mosaic(solid, BAYER[encoding]), solid, 0
    if encoding == "rgb8":
        return frame, frame, 0
    if encoding in ("bgr8", "8UC3"):
        return frame[..., ::-1], frame, 0
    if encoding == "rgba8":
        return np.concatenate([frame, alpha], axis=2), frame, 0
    if encoding == "bgra8":
        return np.concatenate([frame[..., ::-1], alpha], axis=2), frame, 0
    if encoding in ("mono8", "8UC1"):
        return gray, gray.repeat(3, axis=2), 0
    if encoding == "mono16":
        samples = np.random.default_rng(2).integers(0, 65536, frame.shape[:2], dtype=np.uint16)
        pixels = samples.astype("<u2").view(np.uint8).reshape(frame.shape[0], frame.shape[1], 2)
        return pixels, (samples >> 8).astype(np.uint8)[..., None].repeat(3, axis=2), 0
    # 4:2:2 shares chroma between horizontal pixel pairs: with equal pairs only rounding is lost.
    paired = frame[:, ::2].repeat(2, axis=1)
    code = {"yuv422": cv2.COLOR_RGB2YUV_UYVY, "yuv422_yuy2": cv2.COLOR_RGB2YUV_YUY2}[encoding]
    return cv2.cvtColor(paired, code), paired, 2


def _image(pixels: np.ndarray, encoding: str, padding: int = 0, is_bigendian: bool = False) -> Image:
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    padded = np.full((height, rows.shape[1] + padding), PADDING_BYTE, dtype=np.uint8)
    padded[:, : rows.shape[1]] = rows
    return _message(encoding, width, height, padded.shape[1], padded.tobytes(), is_bigendian)


def _message(encoding: str, width: int, height: int, step: int, data: bytes, is_bigendian: bool = False) -> Image:
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=int(is_bigendian), step=step)
    msg.data = data
    return msg


def _compressed(data: bytes, fmt: str) -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.data = data
    return msg


def _encoded(frame: np.ndarray, extension: str) -> bytes:
    ok, buffer = cv2.imencode(extension, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    assert ok
    return buffer.tobytes()


def _assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: int) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.uint8
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= tolerance


def test_every_supported_encoding_is_tested() -> None:
    assert set(SUPPORTED_ENCODINGS) == {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "yuv422", "yuv422_yuy2",
                                        *BAYER, "8UC1", "8UC3"}


@pytest.mark.parametrize("padding", [0, 7], ids=["packed", "padded"])
@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_encoding_converts_to_rgb(encoding: str, padding: int) -> None:
    pixels, expected, tolerance = _encode(encoding, _random_frame())
    _assert_close(image_to_rgb(_image(pixels, encoding, padding)), expected, tolerance)


def test_mono16_big_endian_gives_the_same_frame() -> None:
    pixels, expected, _ = _encode("mono16", _random_frame())
    big_endian = pixels[..., ::-1]  # swap the two bytes of every sample
    np.testing.assert_array_equal(image_to_rgb(_image(big_endian, "mono16", padding=3, is_bigendian=True)), expected)


def test_mono16_keeps_the_high_byte_within_one_of_cv_bridge_scaling() -> None:
    samples = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    msg = _image(samples.astype("<u2").view(np.uint8).reshape(256, 256, 2), "mono16")
    gray = image_to_rgb(msg)[..., 0].astype(int)
    np.testing.assert_array_equal(gray, samples >> 8)
    cv_bridge_gray = np.round(samples * (255 / 65535)).astype(int)
    assert np.abs(gray - cv_bridge_gray).max() <= 1
    assert gray.min() == 0 and gray.max() == 255


@pytest.mark.parametrize(
    ("encoding", "black_then_white"),
    [("yuv422", [128, 16, 128, 235]), ("yuv422_yuy2", [16, 128, 235, 128])],  # U Y0 V Y1 / Y0 U Y1 V
)
def test_yuv422_byte_order(encoding: str, black_then_white: list[int]) -> None:
    frame = image_to_rgb(_message(encoding, 2, 1, 4, bytes(black_then_white)))
    np.testing.assert_array_equal(frame, [[[0, 0, 0], [255, 255, 255]]])


@pytest.mark.parametrize("encoding", BAYER)
def test_bayer_keeps_each_pixels_own_sample(encoding: str) -> None:
    """Away from the border (which OpenCV fills from its neighbours), every pixel keeps the sample its sensor cell
    took: the pattern is read the right way round."""
    frame = _random_frame()
    rgb = image_to_rgb(_image(_mosaic(frame, BAYER[encoding]), encoding, padding=5))
    inside = (slice(1, -1), slice(1, -1))
    np.testing.assert_array_equal(_mosaic(rgb, BAYER[encoding])[inside], _mosaic(frame, BAYER[encoding])[inside])


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_result_is_a_writable_contiguous_copy(encoding: str) -> None:
    pixels, _, _ = _encode(encoding, _random_frame())
    msg = _image(pixels, encoding)
    before = bytes(msg.data)
    frame = image_to_rgb(msg)
    assert frame.flags.c_contiguous and frame.flags.writeable
    assert not np.shares_memory(frame, np.frombuffer(msg.data, dtype=np.uint8))
    frame[...] = 0
    assert bytes(msg.data) == before


@pytest.mark.parametrize("fmt", ["png", "rgb8; png compressed bgr8"])
def test_png_decodes_exactly(fmt: str) -> None:
    frame = _random_frame()
    decoded = compressed_to_rgb(_compressed(_encoded(frame, ".png"), fmt))
    np.testing.assert_array_equal(decoded, frame)
    assert decoded.flags.c_contiguous and decoded.flags.writeable


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", ""])
def test_jpeg_decodes_within_tolerance(fmt: str) -> None:
    # JPEG is lossy (chroma subsampled, quantized): smooth gradients, different per channel, keep the error small.
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frame = np.stack([x * 8, y * 10, (x + y) * 4 + 20], axis=2).astype(np.uint8)
    _assert_close(compressed_to_rgb(_compressed(_encoded(frame, ".jpg"), fmt)), frame, tolerance=12)


def test_rgb_to_image_round_trips() -> None:
    frame = _random_frame()
    header = Header(frame_id="camera")
    header.stamp.sec = 12
    msg = rgb_to_image(frame[:, ::2], header)  # a strided view is fine
    assert (msg.encoding, msg.width, msg.height, msg.step, msg.is_bigendian) == ("rgb8", WIDTH // 2, HEIGHT, 48, 0)
    assert msg.header.frame_id == "camera" and msg.header.stamp.sec == 12
    np.testing.assert_array_equal(image_to_rgb(msg), frame[:, ::2])


def test_rgb_to_compressed_is_a_jpeg_of_the_frame() -> None:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frame = np.stack([x * 8, y * 10, (x + y) * 4 + 20], axis=2).astype(np.uint8)
    header = Header(frame_id="camera")
    msg = rgb_to_compressed(frame, header)
    assert (msg.format, msg.header.frame_id) == ("rgb8; jpeg compressed bgr8", "camera")
    assert bytes(msg.data).startswith(b"\xff\xd8")
    _assert_close(compressed_to_rgb(msg), frame, tolerance=12)


@pytest.mark.parametrize("frame", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3))])
def test_rgb_to_image_rejects_non_rgb8_frames(frame: np.ndarray) -> None:
    with pytest.raises(ImageError, match=r"debug frame must be HxWx3 uint8, got shape \(4, 4(, \d)?\) dtype \w+"):
        rgb_to_image(frame, Header())


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (
            _message("32FC1", 4, 4, 16, bytes(64)),
            "unsupported image encoding '32FC1'; supported: 8UC1, 8UC3, bayer_bggr8, bayer_gbrg8, bayer_grbg8, "
            "bayer_rggb8, bgr8, bgra8, mono16, mono8, rgb8, rgba8, yuv422, yuv422_yuy2",
        ),
        (_message("RGB8", 4, 4, 12, bytes(48)), "unsupported image encoding 'RGB8'"),
        (_message("rgb8", 0, 4, 0, b""), r"image is empty (0x4)"),
        (_message("mono8", 4, 0, 4, b""), r"image is empty (4x0)"),
        (_message("rgb8", 4, 4, 11, bytes(44)), "step 11 is less than width 4 x 3 bytes per pixel"),
        (_message("mono16", 4, 4, 7, bytes(28)), "step 7 is less than width 4 x 2 bytes per pixel"),
        (_message("rgb8", 4, 4, 12, bytes(47)), "data is 47 bytes; step 12 x height 4 needs 48"),
        (_message("rgb8", 4, 4, 12, bytes(49)), "data is 49 bytes; step 12 x height 4 needs 48"),
        (_message("bgra8", 4, 4, 20, bytes(64)), "data is 64 bytes; step 20 x height 4 needs 80"),
        (_message("yuv422", 5, 2, 10, bytes(20)), "yuv422 image width 5 is odd"),
        (_message("yuv422_yuy2", 5, 2, 10, bytes(20)), "yuv422_yuy2 image width 5 is odd"),
        # Claims 8193 x 8192 (201 MB as RGB) with no data: rejected before anything is allocated.
        (
            _message("rgb8", 8193, 8192, 8193 * 3, b""),
            f"image is 8193x8192 = {8193 * 8192} pixels, more than the limit of {MAX_PIXELS}",
        ),
        # Within MAX_PIXELS but 48384 wide: padded to a square it would be 7 GB.
        (_message("rgb8", 48384, 1033, 48384 * 3, b""), f"image is 48384x1033: a side is longer than the limit of {MAX_SIDE} pixels"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_invalid_image_is_rejected(msg: Image, message: str) -> None:
    with pytest.raises(ImageError, match=re.escape(message)):
        image_to_rgb(msg)


def test_pixel_limit_is_a_parameter() -> None:
    msg = _image(np.zeros((4, 4, 3), np.uint8), "rgb8")
    assert image_to_rgb(msg, max_pixels=16).shape == (4, 4, 3)
    with pytest.raises(ImageError, match=re.escape("image is 4x4 = 16 pixels, more than the limit of 15")):
        image_to_rgb(msg, max_pixels=15)


def _with_size(data: bytes, width: int, height: int) -> bytes:
    """The encoded image with the size in its PNG IHDR / JPEG SOF0 header replaced (the pixel data left as is)."""
    patched = bytearray(data)
    if data.startswith(b"\x89PNG"):
        patched[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    else:
        sof = data.index(b"\xff\xc0")
        patched[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(patched)


@pytest.mark.parametrize("extension", [".png", ".jpg"])
def test_compressed_size_is_checked_from_the_header(extension: str) -> None:
    data = _encoded(_random_frame(), extension)
    with pytest.raises(ImageError, match=re.escape(f"image is {WIDTH}x{HEIGHT} = {WIDTH * HEIGHT} pixels")):
        compressed_to_rgb(_compressed(data, "x"), max_pixels=WIDTH * HEIGHT - 1)
    # A small file claiming 60000 x 60000 (a decompression bomb) is rejected before decoding.
    with pytest.raises(ImageError, match=re.escape(f"more than the limit of {MAX_PIXELS}")):
        compressed_to_rgb(_compressed(_with_size(data, 60000, 60000), "x"))
    with pytest.raises(ImageError, match=re.escape("image is empty (0x24)")):
        compressed_to_rgb(_compressed(_with_size(data, 0, 24), "x"))
    # The fuzzer's find: a JPEG claiming 48384 x 1033, fewer pixels than MAX_PIXELS, stalled the worker for 20 s.
    with pytest.raises(ImageError, match=re.escape(f"a side is longer than the limit of {MAX_SIDE} pixels")):
        compressed_to_rgb(_compressed(_with_size(data, 48384, 1033), "x"))


def test_invalid_compressed_image_is_rejected() -> None:
    png = _encoded(_random_frame(), ".png")
    jpeg = _encoded(_random_frame(), ".jpg")
    cases = [
        (b"", "jpeg", r"compressed image is empty \(format 'jpeg'\)$"),
        (b"hello", "jpeg", r"cannot decode 5 bytes as an image \(format 'jpeg'\): not JPEG or PNG data$"),
        (png[:20], "png", r"cannot decode 20 bytes as an image \(format 'png'\): no image size in its header$"),
        (jpeg[:100], "jpeg", r"cannot decode 100 bytes as an image \(format 'jpeg'\): no image size in its header$"),
        (png[:60], "png", r"cannot decode 60 bytes as an image \(format 'png'\)$"),
        (png[:40] + bytes(len(png) - 40), "png", rf"cannot decode {len(png)} bytes as an image \(format 'png'\)$"),
        (jpeg[: len(jpeg) // 2], "jpeg", rf"cannot decode {len(jpeg) // 2} bytes as an image \(format 'jpeg'\)$"),
    ]
    for data, fmt, message in cases:
        with pytest.raises(ImageError, match=message):
            compressed_to_rgb(_compressed(data, fmt))
