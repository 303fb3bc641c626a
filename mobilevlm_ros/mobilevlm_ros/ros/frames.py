"""The latest frame of each camera, kept as the message it arrived in, and the rates its frames arrive at.

Subscription callbacks only store the message (conversion to RGB happens on the worker thread, when a request
actually uses the frame), so a 30 Hz camera costs the executor almost nothing.

Rates, over each camera's last RATE_WINDOW frames: the received rate counts frames per second of the node's clock; the
camera's own rate is read from the frames' header stamps, as the inverse of a short interval between consecutive
received frames (the first quartile: two frames that arrived one after the other are one frame period apart,
whatever was lost around them). sensor_msgs/Image has no sequence number, so this is how lost frames show:
`losing_frames` says so when fewer than half of the camera's frames arrive (raw frames too large for the middleware,
see the README's "Large images and DDS"). The quartile still shows a loss when most frames are lost (the gaps between
those that arrive then spread out), and tolerates a driver's jitter. A driver that leaves the stamps zero has no
rate of its own here.
"""

import collections
import threading
from dataclasses import dataclass

import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from mobilevlm_ros.errors import MobileVLMError
from mobilevlm_ros.ros.image_conversion import compressed_to_rgb, image_to_rgb

RATE_WINDOW = 30  # frames per camera that its rates are measured over
LOST_FRAMES_RATIO = 0.5  # fewer frames received than this share of the camera's rate: frames are being lost


class FrameError(MobileVLMError):
    """No usable frame: unknown camera, nothing received yet, or too old."""


@dataclass(frozen=True)
class Frame:
    camera: str
    msg: Image | CompressedImage
    received_ns: int  # node clock when the message arrived

    @property
    def header_ns(self) -> int:
        """The header stamp in nanoseconds (0: the driver left it unset)."""
        return self.msg.header.stamp.sec * 1_000_000_000 + self.msg.header.stamp.nanosec

    @property
    def stamp_ns(self) -> int:
        """The header stamp, or the arrival time for drivers that leave the stamp at zero."""
        return self.header_ns or self.received_ns

    def to_rgb(self) -> np.ndarray:
        """Decode the message (may raise ImageError for a malformed one)."""
        return compressed_to_rgb(self.msg) if isinstance(self.msg, CompressedImage) else image_to_rgb(self.msg)


@dataclass(frozen=True)
class CameraStats:
    frames: int = 0
    last: Frame | None = None
    received_hz: float | None = None  # frames received per second (None until three have come)
    camera_hz: float | None = None  # the camera's frame rate as its stamps show it

    def losing_frames(self) -> str:
        """Why frames of this camera are being lost ("" when they are not, or it cannot tell yet)."""
        if self.received_hz is None or self.camera_hz is None or self.received_hz >= LOST_FRAMES_RATIO * self.camera_hz:
            return ""
        return (f"camera '{self.last.camera}' receives {self.received_hz:.1f} frames/s of the {self.camera_hz:.1f} its "
                "stamps show: frames are being lost")


class _Camera:
    """What the store keeps of one camera: the count, the latest frame, (header stamp, arrival) of the last frames."""

    def __init__(self) -> None:
        self.frames = 0
        self.last: Frame | None = None
        self.times: collections.deque[tuple[int, int]] = collections.deque(maxlen=RATE_WINDOW)

    def stats(self) -> CameraStats:
        if len(self.times) < 3:
            return CameraStats(self.frames, self.last)
        stamps, arrivals = np.array(self.times, dtype=np.int64).T
        span_s = (arrivals[-1] - arrivals[0]) / 1e9
        intervals = np.diff(stamps)[(stamps[:-1] > 0) & (stamps[1:] > 0)]
        intervals = intervals[intervals > 0]  # repeated or reordered stamps say nothing about the rate
        return CameraStats(
            self.frames, self.last,
            received_hz=(len(arrivals) - 1) / span_s if span_s > 0 else None,
            camera_hz=1e9 / float(np.percentile(intervals, 25)) if len(intervals) >= 2 else None,
        )


class FrameStore:
    """Thread-safe latest-frame-per-camera store."""

    def __init__(self, cameras: list[str]):
        self._lock = threading.Lock()
        self._cameras = {name: _Camera() for name in cameras}

    @property
    def cameras(self) -> list[str]:
        return list(self._cameras)

    def put(self, camera: str, msg: Image | CompressedImage, now_ns: int) -> None:
        frame = Frame(camera, msg, now_ns)
        with self._lock:
            stored = self._cameras[camera]
            stored.frames += 1
            stored.last = frame
            stored.times.append((frame.header_ns, now_ns))

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
        """Per-camera counts, last frames and rates, for diagnostics."""
        with self._lock:
            return {name: stored.stats() for name, stored in self._cameras.items()}
