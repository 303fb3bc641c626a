"""`make demo`: the whole system on the shipped demo model, in one process with three ROS 2 nodes.

- `mobilevlm_node` (the real node, default parameters but a camera named `front`) loads the demo model;
- `demo_camera` publishes synthetic scenes on `front/image` at 10 Hz, like a camera driver;
- `demo_client` shows each scene to the camera, then asks through `~/vqa` or `~/navigate` and saves `~/debug_image`.
Exits 0 when every request was answered (right or wrong: the table says which), 1 otherwise.
"""

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from PIL import Image as PILImage
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.demo.showcase import demo_samples
from mobilevlm_ros.evaluate import is_correct
from mobilevlm_ros.ros.image_conversion import image_to_rgb, rgb_to_image
from mobilevlm_ros.ros.node import MobileVLMNode

logger = logging.getLogger("mobilevlm_demo")

CAMERA = "front"
CALL_TIMEOUT_S = 60.0


class DemoCamera(Node):
    """Publishes the current scene at 10 Hz with fresh stamps, as a camera driver would."""

    def __init__(self) -> None:
        super().__init__("demo_camera")
        self.publisher = self.create_publisher(Image, f"{CAMERA}/image", qos_profile_sensor_data)
        self._frame: np.ndarray | None = None
        self._shown_ns = 0
        self._lock = threading.Lock()
        self.create_timer(0.1, self._publish)

    def show(self, frame: np.ndarray) -> int:
        """Switch to `frame`; returns the time (ns) from which published frames show it."""
        with self._lock:
            self._frame = frame
            self._shown_ns = self.get_clock().now().nanoseconds
            return self._shown_ns

    def _publish(self) -> None:
        with self._lock:
            frame = self._frame
        if frame is not None:
            header = Header(stamp=self.get_clock().now().to_msg(), frame_id=f"{CAMERA}_camera_optical")
            self.publisher.publish(rgb_to_image(frame, header))


def stamp_ns(stamp: Time) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class DemoClient(Node):
    """Asks the node, waits for its answers (the executor spins elsewhere), keeps the debug images it publishes."""

    def __init__(self, node_name: str) -> None:
        super().__init__("demo_client")
        self.vqa = self.create_client(VisualQuery, f"{node_name}/vqa")
        self.navigate = self.create_client(NavigationInstruction, f"{node_name}/navigate")
        self.debug_images: list[np.ndarray] = []
        self.create_subscription(Image, f"{node_name}/debug_image", lambda msg: self.debug_images.append(image_to_rgb(msg)),
                                 qos_profile_sensor_data)

    def call(self, client: Any, request: Any) -> Any:
        if not client.wait_for_service(timeout_sec=CALL_TIMEOUT_S):
            raise RuntimeError(f"{client.srv_name} did not appear")
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(CALL_TIMEOUT_S):
            raise RuntimeError(f"{client.srv_name}: no response in {CALL_TIMEOUT_S:g} s")
        return future.result()


def ask_about(camera: DemoCamera, client: DemoClient, frame: np.ndarray, kind: str, text: str) -> Any:
    """Show `frame` and ask until the answer is about a frame published after it (the first may predate it)."""
    shown_ns = camera.show(frame)
    for _ in range(50):
        if kind == "navigation":
            response = client.call(client.navigate, NavigationInstruction.Request(instruction=text))
        else:
            response = client.call(client.vqa, VisualQuery.Request(question=text, max_new_tokens=8))
        if not response.success and "no frame" not in response.error:
            return response
        if response.success and stamp_ns(response.header.stamp) >= shown_ns:
            return response
        time.sleep(0.1)
    raise RuntimeError(f"the node never answered about the new frame (last error: {response.error or 'an older frame'})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="mobilevlm_demo", help="where ~/debug_image frames are saved")
    parser.add_argument("--per-kind", type=int, default=2, help="questions of each kind (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # a demo: stay on this machine
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    rclpy.init()
    node = MobileVLMNode(parameter_overrides=[Parameter("cameras", value=[CAMERA]), Parameter("camera_topics", value=[f"{CAMERA}/image"])])
    camera, client = DemoCamera(), DemoClient(f"/{node.get_name()}")
    executor = MultiThreadedExecutor(num_threads=4)
    for each in (node, camera, client):
        executor.add_node(each)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    failures = 0
    try:
        node.trigger_configure()
        node.trigger_activate()
        print(f"{'kind':<10} {'question':<62} {'answer':<14} {'expected':<13} {'ms':>6}")
        for index, (frame, sample) in enumerate(demo_samples(args.per_kind)):
            seen = len(client.debug_images)
            response = ask_about(camera, client, frame, sample.kind, sample.question)
            if response.success:
                answer = response.action if sample.kind == "navigation" else response.answer
            else:
                answer = f"error: {response.error}"
            failures += not response.success
            mark = "" if is_correct(answer, sample.answer) else "  (wrong)"
            print(f"{sample.kind:<10} {sample.question:<62} {answer:<14} {sample.answer:<13} {response.latency_s * 1e3:>6.0f}{mark}")
            deadline = time.monotonic() + 2.0
            while len(client.debug_images) == seen and time.monotonic() < deadline:
                time.sleep(0.02)
            if len(client.debug_images) > seen:
                PILImage.fromarray(client.debug_images[-1]).save(out_dir / f"{index:02d}-{sample.kind}.png")
        print(f"debug images in {out_dir}/")
    finally:
        node.trigger_deactivate()
        executor.shutdown(timeout_sec=2.0)
        for each in (node, camera, client):
            each.destroy_node()
        rclpy.try_shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
