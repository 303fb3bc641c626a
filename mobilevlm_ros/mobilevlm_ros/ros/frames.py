"""The latest frame of each camera, kept as the message it arrived in.

Subscription callbacks only store the message (conversion to RGB happens on the worker thread, when a request
actually uses the frame), so a 30 Hz camera costs the executor almost nothing.
"""

import threading
from dataclasses import dataclass

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image

from mobilevlm_ros.errors import MobileVLMError
from mobilevlm_ros.ros.image_conversion import compressed_to_rgb, image_to_rgb


class FrameError(MobileVLMError):
    """No usable frame: unknown camera, nothing received yet, or too old."""


@dataclass(frozen=True)
class Frame:
    camera: str
    msg: Image | CompressedImage
    received_ns: int  # node clock when the message arrived

    @property
    def stamp(self) -> Time:
        return self.msg.header.stamp

    @property
    def stamp_ns(self) -> int:
        """The header stamp, or the arrival time for drivers that leave the stamp at zero."""
        stamp = self.msg.header.stamp.sec * 1_000_000_000 + self.msg.header.stamp.nanosec
        return stamp or self.received_ns

    def to_rgb(self) -> np.ndarray:
        """Decode the message (may raise ImageError for a malformed one)."""
        return compressed_to_rgb(self.msg) if isinstance(self.msg, CompressedImage) else image_to_rgb(self.msg)


@dataclass
class CameraStats:
    frames: int = 0
    last: Frame | None = None


class FrameStore:
    """Thread-safe latest-frame-per-camera store."""

    def __init__(self, cameras: list[str]):
        self._lock = threading.Lock()
        self._cameras = {name: CameraStats() for name in cameras}

    @property
    def cameras(self) -> list[str]:
        return list(self._cameras)

    def put(self, camera: str, msg: Image | CompressedImage, now_ns: int) -> None:
        with self._lock:
            stats = self._cameras[camera]
            stats.frames += 1
            stats.last = Frame(camera, msg, now_ns)

    def latest(self, camera: str, now_ns: int, max_age_s: float) -> Frame:
        """The newest frame of `camera` at most `max_age_s` old (0 = any age), or a FrameError that says why not."""
        with self._lock:
            if camera not in self._cameras:
                raise FrameError(f"unknown camera '{camera}' (cameras: {', '.join(self._cameras)})")
            frame = self._cameras[camera].last
        if frame is None:
            raise FrameError(f"no frame from camera '{camera}' yet")
        age_s = (now_ns - frame.stamp_ns) / 1e9
        if max_age_s and age_s > max_age_s:
            raise FrameError(f"no frame from camera '{camera}' for {age_s:.1f} s (max_frame_age_s is {max_age_s:g})")
        return frame

    def snapshot(self) -> dict[str, CameraStats]:
        """Per-camera counts and last frames, for diagnostics."""
        with self._lock:
            return {name: CameraStats(stats.frames, stats.last) for name, stats in self._cameras.items()}
