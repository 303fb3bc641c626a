"""The package's launch file run through the real ROS 2 launch, and a client that probes the node it starts.

`launch` and `launch_ros` are not on PyPI: MOBILEVLM_ROS2_LAUNCH names a folder holding their unmodified sources for
each distro (`humble/`, `jazzy/`; `../shared/ros2-launch` beside the repository, which `make test` and `.ci/run`
pass). The two distros cannot be imported in one process, and LaunchService must run in its process's main thread,
so each launch runs in a child process with one distro's folder first on PYTHONPATH: this file, run as a script,
is that child (`launch`), and the large-frame publisher (`frames`). The test process probes the node through real
messages: rcl_interfaces parameter services, lifecycle_msgs services, ~/vqa about frames it publishes.

The node is found the way `ros2 launch mobilevlm_ros mobilevlm.launch.py` finds it on a robot: AMENT_PREFIX_PATH
points at this venv, where `make install` laid out share/mobilevlm_ros/ and lib/mobilevlm_ros/ as colcon installs
them (scripts/install_ros_layout.py).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGE = "mobilevlm_ros"
NODE_NAME = "mobilevlm_node"
LAUNCH_ENV = "MOBILEVLM_ROS2_LAUNCH"
DISTROS_ENV = "MOBILEVLM_LAUNCH_DISTROS"  # which of the folder's distros to run (default: all there are)
TIMEOUT_S = 60.0
SHUTDOWN_HANG_S = 30.0  # a launch still running this long after Ctrl-C hangs (LaunchedNode.stop)


def launch_root() -> Path | None:
    value = os.environ.get(LAUNCH_ENV, "")
    return Path(value).resolve() if value else None


def distros() -> list[str]:
    """The distros to run the launch tests with: those asked for in MOBILEVLM_LAUNCH_DISTROS, else humble and jazzy."""
    return os.environ.get(DISTROS_ENV, "humble jazzy").split()


def skip_reason() -> str:
    """Why the launch tests cannot run here (empty when they can)."""
    root = launch_root()
    if root is None:
        return (f"{LAUNCH_ENV} is not set: it names the folder with ROS 2 launch/launch_ros sources per distro "
                "(../shared/ros2-launch; `make test` sets it). On a robot, use its own `ros2 launch`.")
    missing = [str(root / distro / name) for distro in distros() for name in ("launch", "launch_ros")
               if not (root / distro / name).is_dir()]
    if missing:
        return f"{LAUNCH_ENV}={root}: no {', '.join(missing)}"
    return ""


def layout_problems(prefix: Path = Path(sys.prefix)) -> list[str]:
    """What this prefix lacks to run the launch file as an installed package (`make install` lays it out)."""
    needed = [
        prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE,
        prefix / "share" / PACKAGE / "package.xml",
        prefix / "share" / PACKAGE / "launch" / "mobilevlm.launch.py",
        prefix / "share" / PACKAGE / "config" / "mobilevlm.yaml",
        prefix / "share" / PACKAGE / "config" / "fastdds_large_frames.xml",
        prefix / "lib" / PACKAGE / NODE_NAME,
    ]
    problems = [f"{path} is missing (run `make install`)" for path in needed if not path.exists()]
    if importlib.util.find_spec("composition_interfaces") is None:
        problems.append("composition_interfaces is not importable (launch_ros needs it; `make test` builds it)")
    if importlib.util.find_spec("osrf_pycommon") is None:
        problems.append("osrf_pycommon is not installed (launch needs it; requirements.txt pins it)")
    return problems


def child_environment(distro: str, **extra: str | None) -> dict[str, str]:
    """The environment of a launch child: one distro's launch sources first on PYTHONPATH, this venv as the ament
    prefix (as `source install/setup.bash` would set it), one torch thread for the node (a busy 2-core machine);
    then `extra` (None removes a variable)."""
    root = launch_root()
    assert root is not None, skip_reason()
    python_path = [str(root / distro), str(Path(__file__).parent)]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(python_path), "AMENT_PREFIX_PATH": sys.prefix,
                        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | extra
    return {name: value for name, value in env.items() if value is not None}


class LaunchedNode:
    """`mobilevlm.launch.py` in a LaunchService child process, and a client node (in this process) that probes it."""

    def __init__(self, context: Any, distro: str, log_path: Path, arguments: dict[str, str] | None = None,
                 namespace: str = "", env: dict[str, str | None] | None = None):
        from lifecycle_msgs.srv import ChangeState, GetState
        from rcl_interfaces.srv import GetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node

        from mobilevlm_interfaces.srv import VisualQuery

        self.distro, self.log_path = distro, log_path
        self.arguments = dict(arguments or {}) | ({"namespace": namespace} if namespace else {})
        self.fqn = f"/{namespace}/{NODE_NAME}" if namespace else f"/{NODE_NAME}"
        self.ns = f"/{namespace}" if namespace else ""
        with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, __file__, "launch", *[f"{name}:={value}" for name, value in self.arguments.items()]],
                stdout=log, stderr=subprocess.STDOUT, env=child_environment(distro, **(env or {})),
                start_new_session=True,  # its own process group: a failed test can kill the node too
            )
        self.node = Node(f"launch_probe_{distro}_{os.getpid()}_{int(time.monotonic() * 1000) % 100000}", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.get_parameters_client = self.node.create_client(GetParameters, f"{self.fqn}/get_parameters")
        self.get_state_client = self.node.create_client(GetState, f"{self.fqn}/get_state")
        self.change_state_client = self.node.create_client(ChangeState, f"{self.fqn}/change_state")
        self.vqa = self.node.create_client(VisualQuery, f"{self.fqn}/vqa")
        self._publishers: dict[str, Any] = {}
        self.hung_at_shutdown = ""  # the launch's stacks when it hung after Ctrl-C (stop)

    # ---- plumbing ---------------------------------------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def spin_until(self, done: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S,
                   between: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.process.poll() is not None:
                raise AssertionError(f"launch exited ({self.process.returncode}) while waiting for {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")
            if between is not None:
                between()
            self.executor.spin_once(timeout_sec=0.05)

    def call(self, client: Any, request: Any, timeout_s: float = TIMEOUT_S, ask_again_s: float | None = None) -> Any:
        """The response to `request`. With `ask_again_s` (for a request that may be repeated): asked again while none
        has come within that time, since the node drops a response to a client it has not discovered yet (rmw_fastrtps
        waits for the client's reader briefly, then warns "failed to send response (timeout)")."""
        self.spin_until(client.service_is_ready, f"service {client.srv_name}", timeout_s)
        asked = [(time.monotonic(), client.call_async(request))]

        def answered() -> bool:
            if ask_again_s is not None and time.monotonic() - asked[-1][0] > ask_again_s:
                asked.append((time.monotonic(), client.call_async(request)))
            return any(future.done() for _, future in asked)

        self.spin_until(answered, f"response of {client.srv_name}", timeout_s)
        return next(future.result() for _, future in asked if future.done())

    def publisher(self, msg_type: Any, topic: str, qos: Any = None) -> Any:
        from rclpy.qos import qos_profile_sensor_data

        if topic not in self._publishers:
            self._publishers[topic] = self.node.create_publisher(msg_type, topic, qos or qos_profile_sensor_data)
        return self._publishers[topic]

    # ---- what the tests ask -----------------------------------------------------------------------------------------

    def state(self) -> str:
        """The node's lifecycle state label (unconfigured, inactive, active, ...), from lifecycle_msgs/GetState."""
        from lifecycle_msgs.srv import GetState

        return self.call(self.get_state_client, GetState.Request(), ask_again_s=5.0).current_state.label

    def wait_for_state(self, label: str) -> None:
        labels: list[str] = []
        deadline = time.monotonic() + TIMEOUT_S
        while not labels or labels[-1] != label:
            assert time.monotonic() < deadline, f"state {label} never reached (seen {labels}):\n{self.log()}"
            labels.append(self.state())
            if labels[-1] != label:
                time.sleep(0.1)

    def change_state(self, transition_id: int) -> bool:
        """A transition asked from outside, as nav2_lifecycle_manager does (lifecycle_msgs/ChangeState)."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        return self.call(self.change_state_client, ChangeState.Request(transition=Transition(id=transition_id))).success

    def parameters(self, names: list[str]) -> dict[str, Any]:
        """The node's values of `names`, through its rcl_interfaces/GetParameters service."""
        from rcl_interfaces.msg import ParameterType
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        response = self.call(self.get_parameters_client, GetParameters.Request(names=names), ask_again_s=5.0)
        assert len(response.values) == len(names)
        missing = [name for name, value in zip(names, response.values, strict=True) if value.type == ParameterType.PARAMETER_NOT_SET]
        assert not missing, f"parameters not declared: {missing}"
        return {name: parameter_value_to_python(value) for name, value in zip(names, response.values, strict=True)}

    def ask_about(self, frame: Any, topic: str, question: str = "What is in the image?", camera: str = "",
                  between: Callable[[], None] | None = None, accept: Callable[[Any], bool] | None = None) -> Any:
        """Publish `frame` on `topic` (best effort, as a camera does) and ask `~/vqa` until a response is accepted (by
        default: an answer about this very frame, by its stamp), and return it. The camera subscription may match
        after the first frames, so it keeps publishing; "no frame from camera 'X' yet" and answers about an older
        frame mean ask again, any other error fails."""
        from mobilevlm_interfaces.srv import VisualQuery

        stamp = frame.header.stamp
        accept = accept or (lambda response: response.success and response.header.stamp == stamp)
        publisher = self.publisher(type(frame), topic)
        self.spin_until(self.vqa.service_is_ready, f"service {self.vqa.srv_name}")
        pending: list[Any] = []

        def accepted() -> bool:
            if pending and pending[-1].done():
                response = pending.pop().result()
                if accept(response):
                    pending.append(response)
                    return True
                if not response.success and not response.error.endswith(" yet"):
                    raise AssertionError(f"~/vqa failed: {response.error}\n{self.log()}")
            return False

        def publish() -> None:
            publisher.publish(frame)
            if between is not None:
                between()
            if not pending:
                pending.append(self.vqa.call_async(VisualQuery.Request(question=question, camera=camera)))

        self.spin_until(accepted, f"an accepted ~/vqa response about the frame on {topic}", between=publish)
        return pending[-1]

    def stop(self) -> int:
        """Ctrl-C, as in the terminal that runs `ros2 launch`: SIGINT to the launch's whole process group (the launch
        and the node; launch then sends the node no second SIGINT, only SIGTERM after 5 s); the launch's exit status.

        Upstream launch has a shutdown race that, rarely, leaves it running after every process it started has exited
        (seen once, in CI's Jazzy run on a loaded 2-core machine, not in 30 repeated launches since; ros2/launch_ros#199
        is the open report of its kind). When the launch is still running SHUTDOWN_HANG_S after Ctrl-C, its Python
        stacks go to its log (faulthandler, run_launch), it gets SIGTERM as a user would then send, and
        `hung_at_shutdown` holds the stacks for the caller to report."""
        try:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGINT)
                try:
                    self.process.wait(timeout=SHUTDOWN_HANG_S)
                except subprocess.TimeoutExpired:
                    before = self.log()
                    os.kill(self.process.pid, signal.SIGUSR1)
                    time.sleep(1)
                    self.hung_at_shutdown = self.log()[len(before):] or "(no stacks written)"
                    os.kill(self.process.pid, signal.SIGTERM)
                    try:
                        self.process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(self.process.pid, signal.SIGKILL)
                        self.process.wait()
                        raise AssertionError(f"the launch stopped on neither SIGINT nor SIGTERM:\n{self.log()}") from None
            return self.process.returncode
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        else:
            try:  # the node, should the launch have died without stopping it
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.executor.shutdown(timeout_sec=1)
        self.node.destroy_node()


def rgb8(height: int, width: int, seed: int, stamp: Any) -> Any:
    """A raw sensor_msgs/Image (rgb8) with structure, stamped `stamp`."""
    import numpy as np
    from sensor_msgs.msg import Image

    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :] = rng.integers(0, 256, 3, dtype=np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    msg = Image(height=height, width=width, encoding="rgb8", step=width * 3, data=pixels.tobytes())
    msg.header.stamp = stamp
    msg.header.frame_id = "camera_optical"
    return msg


def jpeg(height: int, width: int, seed: int, stamp: Any) -> Any:
    """The same picture as a sensor_msgs/CompressedImage (jpeg)."""
    import cv2
    import numpy as np
    from sensor_msgs.msg import CompressedImage

    raw = rgb8(height, width, seed, stamp)
    pixels = np.frombuffer(bytes(raw.data), np.uint8).reshape(height, width, 3)
    ok, data = cv2.imencode(".jpg", pixels[:, :, ::-1])
    assert ok
    msg = CompressedImage(format="jpeg", data=data.tobytes())
    msg.header = raw.header
    return msg


# ---- the child processes ----------------------------------------------------------------------------------------------


def run_launch(arguments: list[str]) -> int:
    """`ros2 launch mobilevlm_ros mobilevlm.launch.py NAME:=VALUE ...`, in this process's main thread, until SIGINT."""
    import launch
    import launch_ros
    from ament_index_python.packages import get_package_share_directory
    from launch import LaunchDescription, LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a launch that hangs says where (LaunchedNode.stop)
    print(f"launch from {Path(launch.__file__).parent}, launch_ros from {Path(launch_ros.__file__).parent}", flush=True)
    path = Path(get_package_share_directory(PACKAGE)) / "launch" / "mobilevlm.launch.py"
    launch_arguments = [tuple(argument.split(":=", 1)) for argument in arguments]
    service = LaunchService(argv=arguments)
    service.include_launch_description(LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(path)), launch_arguments=launch_arguments),
    ]))
    return service.run()


def run_frames(args: argparse.Namespace) -> int:
    """Publish `count` raw frames once each (best effort as most camera drivers do, or reliable) and ask `~/vqa` after
    each whether the node has it; print how many it answered about, as JSON. Fast DDS reads
    FASTDDS_DEFAULT_PROFILES_FILE from this process's environment (the parent sets it or not). A reliable publisher
    first waits for the node to subscribe reliable in turn (qos_reliability auto)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from mobilevlm_interfaces.srv import VisualQuery

    rclpy.init()
    node = rclpy.create_node(f"frame_publisher_{os.getpid()}")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    reliability = ReliabilityPolicy.RELIABLE if args.reliable else ReliabilityPolicy.BEST_EFFORT
    qos = QoSProfile(depth=qos_profile_sensor_data.depth, reliability=reliability)
    publisher = node.create_publisher(Image, args.topic, qos)
    vqa = node.create_client(VisualQuery, f"{args.node}/vqa")

    def ask(deadline: float) -> Any:
        future = vqa.call_async(VisualQuery.Request(question="What is in the image?"))
        while not future.done():
            if time.monotonic() > deadline:
                return None
            executor.spin_once(timeout_sec=0.05)
        return future.result()

    def about(response: Any, stamp: Any) -> bool:
        return response is not None and response.success and response.header.stamp == stamp

    def matched() -> bool:
        """The node subscribes, reliable when this publisher is (it follows the publishers within its check period)."""
        subscriptions = [info for info in node.get_subscriptions_info_by_topic(args.topic)
                         if info.node_name == NODE_NAME]
        return bool(subscriptions) and (not args.reliable or subscriptions[0].qos_profile.reliability == reliability)

    start = time.monotonic()
    while not (publisher.get_subscription_count() and vqa.service_is_ready() and matched()):
        assert time.monotonic() - start < TIMEOUT_S, \
            "the node's camera subscription (as reliable as asked) and ~/vqa never appeared"
        executor.spin_once(timeout_sec=0.1)
    # Warm-up, not counted: publish until one frame is answered, so discovery is complete both ways. Without the profile
    # on this side none may arrive for as long (a loaded machine drains its UDP socket too late): then none counts.
    warm = rgb8(args.height, args.width, 0, node.get_clock().now().to_msg())
    warmed = about(ask(time.monotonic() + 5), warm.header.stamp)
    while not warmed and time.monotonic() - start < TIMEOUT_S:
        publisher.publish(warm)
        time.sleep(0.2)
        warmed = about(ask(time.monotonic() + 5), warm.header.stamp)
    arrived = [] if warmed else [False] * args.count
    for index in range(args.count if warmed else 0):
        frame = rgb8(args.height, args.width, index + 1, node.get_clock().now().to_msg())
        publisher.publish(frame)  # once, as a camera publishes its next frame
        time.sleep(args.ask_after_s)
        deadline = time.monotonic() + args.patience_s
        while True:  # a late frame still counts as arrived; one answered about an older frame is not
            response = ask(deadline)
            if about(response, frame.header.stamp) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        arrived.append(about(response, frame.header.stamp))
    print(json.dumps({"arrived": sum(arrived), "count": args.count, "width": args.width, "height": args.height,
                      "reliable": args.reliable, "warmed up": warmed,
                      "profile": os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE", "")}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def frame_counts(distro: str, node_fqn: str, topic: str, width: int, height: int, env: dict[str, str | None],
                 count: int = 20, patience_s: float = 3.0, reliable: bool = False) -> dict[str, Any]:
    """Run the frame publisher child (see run_frames) and return what it measured."""
    result = subprocess.run(
        [sys.executable, __file__, "frames", "--node", node_fqn, "--topic", topic, "--width", str(width),
         "--height", str(height), "--count", str(count), "--patience-s", str(patience_s),
         *(["--reliable"] if reliable else [])],
        env=child_environment(distro, **env), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description="child processes of the launch tests")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("launch", help="run mobilevlm.launch.py in a LaunchService").add_argument("arguments", nargs="*")
    frames = commands.add_parser("frames", help="publish raw frames once each and count those the node answers about")
    frames.add_argument("--node", required=True)
    frames.add_argument("--topic", required=True)
    frames.add_argument("--width", type=int, required=True)
    frames.add_argument("--height", type=int, required=True)
    frames.add_argument("--count", type=int, default=20)
    frames.add_argument("--ask-after-s", type=float, default=0.3)
    frames.add_argument("--patience-s", type=float, default=3.0)
    frames.add_argument("--reliable", action="store_true", help="publish reliable, not best effort")
    args = parser.parse_args()
    if args.command == "launch":
        return run_launch(args.arguments)
    return run_frames(args)


if __name__ == "__main__":
    sys.exit(main())
