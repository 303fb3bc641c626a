"""The ROS side of the tests: mobilevlm_node in this process (`Harness`) or as its own process (`start_node_process`,
`ProcessClient`), camera messages (`encode`), and the one bounded wait every test uses (`spin_until`).

Tests talk to the node through a client node, exactly as another process would.
"""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import SetParametersResult
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import Executor, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from mobilevlm_interfaces.action import Ask
from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.ros.node import NODE_NAME, REQUEST_QOS, MobileVLMNode

TIMEOUT_S = 30.0  # bound on every wait for the node; none of them is a measurement
PROCESS_TIMEOUT_S = 60.0  # a node in its own process loads its model first
FRAME = np.random.default_rng(11).integers(0, 256, (48, 64, 3), dtype=np.uint8)
FRAME_ID = "camera_optical"
# Every client of a service reads every response to the service (rmw_fastrtps takes them all and keeps its own), so
# under load the responses to other clients can push a client's own out of a default KEEP_LAST(10) history: the
# clients keep them all, as the node keeps all requests.
CLIENT_QOS = REQUEST_QOS
DEFAULT_CAMERA = "camera"  # the first of `node_parameters`' cameras
MAX_NEW_TOKENS = 6  # `node_parameters`' answer length: enough to tell answers apart, short enough to be quick


def spin_until(executor: Executor, done: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Spin `executor` until `done()` holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        executor.spin_once(timeout_sec=0.05)


def call(executor: Executor, client: Any, request: Any, timeout_s: float = TIMEOUT_S) -> Any:
    """Call a service and spin `executor` until its response; fail after `timeout_s`."""
    assert client.wait_for_service(timeout_sec=timeout_s), f"{client.srv_name} never appeared"
    future = client.call_async(request)
    spin_until(executor, future.done, f"{client.srv_name} response", timeout_s)
    return future.result()


class LifecycleClient:
    """A node's lifecycle_msgs services, called from outside as a lifecycle manager (nav2_lifecycle_manager) does."""

    def __init__(self, node: Node, executor: Executor, fqn: str, timeout_s: float = TIMEOUT_S):
        self.executor, self.timeout_s = executor, timeout_s
        self.change_state = node.create_client(ChangeState, f"{fqn}/change_state")
        self.get_state = node.create_client(GetState, f"{fqn}/get_state")

    def state(self) -> str:
        """The node's lifecycle state label (unconfigured, configuring, inactive, active, ...)."""
        return call(self.executor, self.get_state, GetState.Request(), self.timeout_s).current_state.label

    def request(self, transition: int) -> Any:
        """Ask for `transition` (a lifecycle_msgs/Transition id); the future of the ChangeState response."""
        assert self.change_state.wait_for_service(timeout_sec=TIMEOUT_S), "change_state never appeared"
        return self.change_state.call_async(ChangeState.Request(transition=Transition(id=transition)))


def stamp(sec: int) -> Time:
    return Time(sec=sec, nanosec=123)


def rggb_mosaic(rgb: np.ndarray) -> np.ndarray:
    """What an RGGB Bayer sensor records of `rgb`: red at even rows and columns, blue at odd ones, green elsewhere."""
    mosaic = rgb[:, :, 1].copy()
    mosaic[0::2, 0::2] = rgb[0::2, 0::2, 0]
    mosaic[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return mosaic


def encode(rgb: np.ndarray, encoding: str, stamp: Time, pad: int = 0) -> Image:
    """A sensor_msgs/Image of `rgb` in `encoding`, rows padded by `pad` bytes (bayer_rggb8: the RGGB mosaic)."""
    conversions = {
        "rgb8": lambda x: x, "bgr8": lambda x: x[:, :, ::-1], "8UC3": lambda x: x[:, :, ::-1],
        "8UC1": lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2GRAY),
        "bayer_rggb8": rggb_mosaic,
        "rgba8": lambda x: np.dstack([x, np.full(x.shape[:2], 255, np.uint8)]),
        "bgra8": lambda x: np.dstack([x[:, :, ::-1], np.full(x.shape[:2], 255, np.uint8)]),
        "mono8": lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2GRAY),
        "mono16": lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(">u2") * 257,
        "yuv422_yuy2": lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2YUV_YUY2),
        "yuv422": lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2YUV_YUY2).reshape(x.shape[0], -1, 4)[:, :, [1, 0, 3, 2]],
    }
    pixels = np.ascontiguousarray(conversions[encoding](rgb))
    rows = pixels.reshape(rgb.shape[0], -1).view(np.uint8).reshape(rgb.shape[0], -1)
    rows = np.hstack([rows, np.zeros((rows.shape[0], pad), np.uint8)])
    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding=encoding, step=rows.shape[1],
                is_bigendian=int(encoding == "mono16"), data=rows.tobytes())
    msg.header.stamp = stamp
    msg.header.frame_id = FRAME_ID
    return msg


def node_parameters(checkpoint: Path, **overrides: Any) -> dict[str, Any]:
    """The tests' node: short answers, no frame age limit, a raw default camera and a compressed one; it builds its
    tiny artifacts (GGUF, ONNX graph, mmproj) at configure."""
    return {"model_path": str(checkpoint), "max_new_tokens": MAX_NEW_TOKENS, "max_frame_age_s": 0.0, "engine_build": "if_missing",
            "cameras": [DEFAULT_CAMERA, "front"], "camera_topics": ["image", "front/image"],
            "camera_transports": ["raw", "compressed"], **overrides}


def diagnostic_values(status: DiagnosticStatus) -> dict[str, str]:
    return {value.key: value.value for value in status.values}


class Harness:
    """The node on a background executor, a client node driven from the test thread. A context manager: leaving it
    shuts the node down."""

    def __init__(self, context: Context, parameters: dict[str, Any], namespace: str):
        """The node runs in `namespace`, so harnesses alive at the same time never share topics or services."""
        self.ns = f"/{namespace}"
        self.node = MobileVLMNode(context=context, namespace=namespace,
                                  parameter_overrides=[Parameter(k, value=v) for k, v in parameters.items()])
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.client = Node("test_client", context=context)
        self.client_executor = SingleThreadedExecutor(context=context)
        self.client_executor.add_node(self.client)
        self.camera = self.client.create_publisher(Image, f"{self.ns}/image", qos_profile_sensor_data)
        self.vqa = self.client.create_client(VisualQuery, self.name("vqa"), qos_profile=CLIENT_QOS)
        self.navigate = self.client.create_client(NavigationInstruction, self.name("navigate"), qos_profile=CLIENT_QOS)
        self.set_parameters = self.client.create_client(SetParameters, self.name("set_parameters"))
        self.lifecycle = LifecycleClient(self.client, self.client_executor, f"{self.ns}/{NODE_NAME}")

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def name(self, relative: str) -> str:
        """The full name of one of the node's topics, services or actions (`~/relative`)."""
        return f"{self.ns}/{NODE_NAME}/{relative}"

    def activate(self) -> "Harness":
        """Configure and activate the node, as autostart or a lifecycle manager would."""
        assert self.node.trigger_configure() == TransitionCallbackReturn.SUCCESS, self.node.configure_error
        assert self.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        return self

    def close(self) -> None:
        if self.lifecycle.state() != "finalized":
            self.node.trigger_shutdown()
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(5)
        self.node.destroy_node()
        self.client.destroy_node()

    def spin_until(self, done: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
        spin_until(self.client_executor, done, what, timeout_s)

    def call(self, client: Any, request: Any) -> Any:
        return call(self.client_executor, client, request)

    def set_parameter(self, name: str, value: Any) -> SetParametersResult:
        """Set one of the node's parameters through its set_parameters service, as `ros2 param set` does."""
        request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
        [result] = self.call(self.set_parameters, request).results
        return result

    def publish_frame(self, msg: Image, publisher: Any = None, camera: str = DEFAULT_CAMERA) -> None:
        """Publish until the node has stored this very message as the camera's latest frame."""
        publisher = publisher or self.camera
        self.spin_until(lambda: publisher.get_subscription_count() > 0, "camera subscription")

        def stored_or_published_again() -> bool:
            latest = self.node.frames.snapshot()[camera].last
            if latest is not None and latest.msg.header.stamp == msg.header.stamp:
                return True
            publisher.publish(msg)
            return False

        self.spin_until(stored_or_published_again, "the frame to arrive")

    def send_ask_goal(self, client: ActionClient, goal: Ask.Goal, feedback: list[str]) -> Any:
        """Send `goal` (collecting partial answers into `feedback`) and return the accepted goal handle."""
        assert client.wait_for_server(timeout_sec=TIMEOUT_S)
        goal_future = client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback.partial_answer))
        self.spin_until(goal_future.done, "goal response")
        assert goal_future.result().accepted
        return goal_future.result()

    def ask_result(self, handle: Any) -> Any:
        result_future = handle.get_result_async()
        self.spin_until(result_future.done, "ask result")
        return result_future.result()


def start_node_process(checkpoint: Path, namespace: str, log_path: Path, **parameters: Any) -> subprocess.Popen:
    """The `mobilevlm_node` console script in `namespace`, its output in `log_path`.

    With one torch thread: the tiny model's matrices are too small to share out, and on a busy 2-core machine torch's
    spinning worker threads make each of its operations 10-100x slower.
    """
    arguments = [f"{name}:={value}" for name, value in {"model_path": checkpoint, "max_frame_age_s": 0.0, **parameters}.items()]
    with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "mobilevlm_node"), "--ros-args", "-r", f"__ns:=/{namespace}",
             *[item for argument in arguments for item in ("-p", argument)]],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"},
        )


class ProcessClient:
    """A client node in this process for a node running as a separate process."""

    def __init__(self, context: Context, namespace: str, name: str = ""):
        self.node = Node(name or f"client_{namespace}", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.camera = self.node.create_publisher(Image, f"/{namespace}/image", qos_profile_sensor_data)
        self.vqa = self.node.create_client(VisualQuery, f"/{namespace}/{NODE_NAME}/vqa", qos_profile=CLIENT_QOS)
        self.navigate = self.node.create_client(NavigationInstruction, f"/{namespace}/{NODE_NAME}/navigate", qos_profile=CLIENT_QOS)
        self.ask = ActionClient(self.node, Ask, f"/{namespace}/{NODE_NAME}/ask")
        self.lifecycle = LifecycleClient(self.node, self.executor, f"/{namespace}/{NODE_NAME}", PROCESS_TIMEOUT_S)
        self.diagnostics: list[DiagnosticStatus] = []  # this node's statuses on /diagnostics, oldest first
        self.node.create_subscription(DiagnosticArray, "/diagnostics", lambda msg: self.diagnostics.extend(
            s for s in msg.status if s.name == f"/{namespace}/{NODE_NAME}: inference"), 10)

    def answer_first(self, frame: Image, question: str) -> VisualQuery.Response:
        """Ask until answered, publishing `frame` meanwhile: the camera subscription may match after the first frames."""
        assert self.vqa.wait_for_service(timeout_sec=PROCESS_TIMEOUT_S), f"{self.vqa.srv_name} never appeared"
        asked = [self.vqa.call_async(VisualQuery.Request(question=question))]

        def answered() -> bool:
            if not asked[-1].done():
                self.camera.publish(frame)
                return False
            if not asked[-1].result().success and "no frame" in asked[-1].result().error:
                asked.append(self.vqa.call_async(VisualQuery.Request(question=question)))
                return False
            return True

        self.spin_until(answered, "an answer about the published frame")
        return asked[-1].result()

    def call(self, client: Any, request: Any) -> Any:
        return call(self.executor, client, request, PROCESS_TIMEOUT_S)

    def destroy(self) -> None:
        self.ask.destroy()
        self.node.destroy_node()

    def spin_until(self, done: Callable[[], bool], what: str, timeout_s: float = PROCESS_TIMEOUT_S) -> None:
        spin_until(self.executor, done, what, timeout_s)
