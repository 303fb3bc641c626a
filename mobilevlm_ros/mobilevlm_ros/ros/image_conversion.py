"""ROS image messages to the model's RGB frames (HxWx3 uint8), and an RGB frame back to messages for the debug topics.

Why not cv_bridge: the PyPI `cv-bridge` is a ROS 1 port that is broken with numpy >= 2.3 / OpenCV 5, has no yuv422 and
ignores row padding; the real ROS 2 cv_bridge adds a C++ dependency for no gain here. The conversion below is a few
numpy slices and one `cv2.cvtColor`, and it validates a (possibly hostile) message's dimensions, step and data length
before touching the data, so every install behaves the same and a bad message is a specific `ImageError`.
"""

from __future__ import annotations

import array
from dataclasses import dataclass

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from mobilevlm_ros.errors import ImageError

# 8192 x 8192: far above any camera we expect, small enough that a lying message cannot make us allocate gigabytes.
MAX_PIXELS = 8192 * 8192
# Each side too: preprocessing pads a frame to a square of its longer side, so a 48000x1000 frame (within MAX_PIXELS)
# would become a 7 GB square and stall the worker for many seconds.
MAX_SIDE = 8192


@dataclass(frozen=True)
class _Encoding:
    channels: int
    bytes_per_channel: int
    to_rgb: int | None  # cv2.cvtColor code; None when the pixels already are RGB

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * self.bytes_per_channel


# yuv422 is UYVY byte order (U0 Y0 V0 Y1) as sensor_msgs/image_encodings defines it; yuv422_yuy2 is YUYV. Both are
# 2 bytes per pixel, which OpenCV reads as a 2-channel image. A Bayer mosaic is demosaiced by OpenCV, which names a
# pattern by the pixels of its second row from the second column on: ROS's bayer_rggb8 is OpenCV's BayerBG (the same
# mapping as cv_bridge's). The generic 8UC1 is a grey image and 8UC3 OpenCV's own channel order, BGR (what a cv::Mat
# published without a colour encoding holds).
_ENCODINGS: dict[str, _Encoding] = {
    "rgb8": _Encoding(3, 1, None),
    "bgr8": _Encoding(3, 1, cv2.COLOR_BGR2RGB),
    "rgba8": _Encoding(4, 1, cv2.COLOR_RGBA2RGB),
    "bgra8": _Encoding(4, 1, cv2.COLOR_BGRA2RGB),
    "mono8": _Encoding(1, 1, cv2.COLOR_GRAY2RGB),
    "mono16": _Encoding(1, 2, cv2.COLOR_GRAY2RGB),
    "yuv422": _Encoding(2, 1, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": _Encoding(2, 1, cv2.COLOR_YUV2RGB_YUY2),
    "bayer_rggb8": _Encoding(1, 1, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": _Encoding(1, 1, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": _Encoding(1, 1, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": _Encoding(1, 1, cv2.COLOR_BayerGB2RGB),
    "8UC1": _Encoding(1, 1, cv2.COLOR_GRAY2RGB),
    "8UC3": _Encoding(3, 1, cv2.COLOR_BGR2RGB),
}
SUPPORTED_ENCODINGS = tuple(sorted(_ENCODINGS))

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8"
# JPEG start-of-frame markers (SOF0..SOF15 except DHT, JPG and DAC), which carry the image size.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_START_OF_SCAN = 0xDA


def image_to_rgb(msg: Image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Convert a `sensor_msgs/Image` to a new HxWx3 uint8 RGB array (C-contiguous, not sharing the message's buffer).

    Row padding (`step` > width x bytes per pixel) is skipped. mono16 keeps the high byte of each sample (value >> 8):
    like cv_bridge's 16 -> 8 bit scaling (x 255/65535, rounded) it maps 0..65535 onto 0..255, differing from it by at
    most 1, but is exact integer work. As with cv_bridge, sensors that fill only the low bits come out dark.
    """
    encoding = _ENCODINGS.get(msg.encoding)
    if encoding is None:
        raise ImageError(f"unsupported image encoding {msg.encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")
    width, height, step = msg.width, msg.height, msg.step
    _check_size(width, height, max_pixels)
    if encoding.channels == 2 and width % 2:
        raise ImageError(f"{msg.encoding} image width {width} is odd; 4:2:2 packs pixels in pairs")
    row_bytes = width * encoding.bytes_per_pixel
    if step < row_bytes:
        raise ImageError(f"step {step} is less than width {width} x {encoding.bytes_per_pixel} bytes per pixel")
    if len(msg.data) != step * height:
        raise ImageError(f"data is {len(msg.data)} bytes; step {step} x height {height} needs {step * height}")

    rows = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, step)[:, :row_bytes]
    if encoding.bytes_per_channel == 2:
        rows = rows[:, (0 if msg.is_bigendian else 1) :: 2]  # the high byte of each 16-bit sample
    pixels = rows.reshape(height, width, encoding.channels)
    if encoding.to_rgb is None:
        return np.array(pixels, order="C", copy=True)
    return cv2.cvtColor(pixels, encoding.to_rgb)


def compressed_to_rgb(msg: CompressedImage, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a JPEG or PNG `sensor_msgs/CompressedImage` to a new HxWx3 uint8 RGB array.

    The `format` field varies by publisher ("jpeg", "rgb8; jpeg compressed bgr8", ...), so the data's signature decides.
    The size in the JPEG/PNG header is checked against `max_pixels` before decoding, so a small file that claims a
    huge image (a decompression bomb) is rejected without allocating it. Other formats are rejected for the same reason.
    """
    data = bytes(msg.data)
    if not data:
        raise ImageError(f"compressed image is empty (format {msg.format!r})")
    cannot_decode = f"cannot decode {len(data)} bytes as an image (format {msg.format!r})"
    if data.startswith(_PNG_SIGNATURE):
        size = _png_size(data)
    elif data.startswith(_JPEG_SIGNATURE):
        size = _jpeg_size(data)
    else:
        raise ImageError(f"{cannot_decode}: not JPEG or PNG data")
    if size is None:
        raise ImageError(f"{cannot_decode}: no image size in its header")
    _check_size(*size, max_pixels)

    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(cannot_decode)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def rgb_to_image(frame: np.ndarray, header: Header) -> Image:
    """Wrap an HxWx3 uint8 RGB frame as an rgb8 `sensor_msgs/Image` (no row padding) for the debug-image topic."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ImageError(f"debug frame must be HxWx3 uint8, got shape {frame.shape} dtype {frame.dtype}")
    height, width = frame.shape[:2]
    msg = Image(header=header, height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3)
    # An array.array('B') is stored as is (bytes would be checked element by element in Python); tobytes() is C order
    # even for a strided view.
    msg.data = array.array("B", frame.tobytes())
    return msg


def rgb_to_compressed(frame: np.ndarray, header: Header, quality: int = 90) -> CompressedImage:
    """Encode an HxWx3 uint8 RGB frame as a jpeg `sensor_msgs/CompressedImage`, its format written the way
    image_transport's compressed plugin writes it (viewers such as Foxglove and rqt_image_view read it)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError(f"cannot encode a {frame.shape} frame as jpeg")
    msg = CompressedImage(header=header, format="rgb8; jpeg compressed bgr8")
    msg.data = array.array("B", data.tobytes())
    return msg


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width == 0 or height == 0:
        raise ImageError(f"image is empty ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
    if max(width, height) > MAX_SIDE:
        raise ImageError(f"image is {width}x{height}: a side is longer than the limit of {MAX_SIDE} pixels")


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk, which the PNG format requires to come first."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the start-of-frame segment, walking the marker segments that precede it."""
    i = len(_JPEG_SIGNATURE)
    while i + 4 <= len(data):
        if data[i] != 0xFF:  # stray bytes between segments: skip them, as libjpeg does
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, or a marker without a length
            i += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_SOF_MARKERS:
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        if marker == _JPEG_START_OF_SCAN:
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None
