"""mobilevlm.launch.py through the real `launch.LaunchService` of ROS 2 Humble and Jazzy, as `ros2 launch` runs it.

Each case launches the installed package (share/mobilevlm_ros, lib/mobilevlm_ros, found through AMENT_PREFIX_PATH)
in a child process with one distro's launch sources, and checks what the node really does through real messages:
its parameters (rcl_interfaces/GetParameters), its lifecycle state (lifecycle_msgs/GetState, ChangeState) and `~/vqa`
answers about frames published here (by the answer's image stamp). Ctrl-C (SIGINT) then stops the launch and the
node cleanly. Skipped, with the reason, where MOBILEVLM_ROS2_LAUNCH names no launch sources (a robot has its own).
"""

from __future__ import annotations

import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from launch_harness import LaunchedNode, distros, frame_counts, jpeg, launch_root, layout_problems, rgb8, skip_reason

pytestmark = pytest.mark.skipif(bool(skip_reason()), reason=skip_reason() or "runs")

SMALL = (48, 64)  # height, width of the frames the cases publish


@pytest.fixture(scope="module")
def installed() -> None:
    """The package must be laid out as installed: with MOBILEVLM_ROS2_LAUNCH set, a missing layout is a failure."""
    problems = layout_problems()
    assert not problems, "\n".join(problems)


@pytest.fixture(params=distros())
def distro(request, installed) -> str:
    return request.param


@pytest.fixture
def launch(ros_context, distro, tmp_path) -> Iterator[Callable[..., LaunchedNode]]:
    """Start the launch file with the given arguments; at the end, Ctrl-C must stop the launch and the node cleanly."""
    started: list[LaunchedNode] = []

    def start(arguments: dict[str, str] | None = None, namespace: str = "", env: dict[str, str] | None = None) -> LaunchedNode:
        node = LaunchedNode(ros_context, distro, tmp_path / f"launch_{len(started)}.log", arguments, namespace, env)
        started.append(node)
        return node

    yield start
    for node in started:
        assert node.process.poll() is None, f"the launch exited early:\n{node.log()}"
        status = node.stop()
        if node.hung_at_shutdown:
            assert_launch_hung_after_its_node_exited(node)
        else:
            assert status == 0, node.log()
        assert f"launch from {launch_root() / distro / 'launch'}," in node.log(), "the launch ran other launch sources"
        assert_node_stopped(node.log())


def assert_node_stopped(log: str) -> None:
    """The node answered Ctrl-C: it stopped serving ("stopped in N s") and its process exited cleanly, by itself
    (issue 21 saw it hang at interpreter exit in about 1 of 10 launches, until launch killed it)."""
    assert "mobilevlm_node]: stopped in " in log, log
    assert "process has finished cleanly" in log and "escalating to 'SIGTERM'" not in log, log


def assert_launch_hung_after_its_node_exited(node: LaunchedNode) -> None:
    """Upstream launch's shutdown race (LaunchedNode.stop): tolerated only once mobilevlm_node, which is ours, has
    exited cleanly; reported as a warning with the launch's stacks."""
    assert "process has finished cleanly" in node.log(), f"the launch hung with its node still running:\n{node.log()}"
    warnings.warn("launch (upstream) did not exit on Ctrl-C although mobilevlm_node had finished cleanly; it exited on "
                  f"SIGTERM. Its stacks:\n{node.hung_at_shutdown}", stacklevel=2)


@pytest.fixture(scope="module")
def robot_model(tmp_path_factory) -> Path:
    """A model directory of the user's (a copy of the shipped demo checkpoint, so the node loads it quickly)."""
    from mobilevlm_ros.demo import DEMO_CHECKPOINT

    return Path(shutil.copytree(DEMO_CHECKPOINT, tmp_path_factory.mktemp("models") / "robot_model"))


def declared_defaults() -> dict[str, Any]:
    from mobilevlm_ros.ros.parameters import SPECS

    return {spec.name: spec.default for spec in SPECS}


def stamp(sec: int, nanosec: int = 0) -> Any:
    from builtin_interfaces.msg import Time

    return Time(sec=sec, nanosec=nanosec)


def fresh(node: LaunchedNode) -> Any:
    return node.node.get_clock().now().to_msg()


def write_params(path: Path, key: str, values: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({key: {"ros__parameters": values}}))
    return path


def assert_answers(node: LaunchedNode, frame: Any, topic: str, camera: str = "") -> Any:
    response = node.ask_about(frame, topic, camera=camera)
    assert response.success, response.error
    assert response.header.stamp == frame.header.stamp
    assert response.camera == (camera or "camera")
    return response


def test_defaults(launch):
    node = launch()
    node.wait_for_state("active")
    defaults = declared_defaults()
    assert node.parameters([*defaults, "use_sim_time"]) == defaults | {"use_sim_time": False}
    assert_answers(node, rgb8(*SMALL, 1, fresh(node)), "/image")
    # A frame stamped in a bag's past is refused as stale on the wall clock (see test_use_sim_time).
    from_a_bag = rgb8(*SMALL, 2, stamp(1000, 500_000_000))
    stale = node.ask_about(from_a_bag, "/image", accept=lambda r: not r.success and "max_frame_age_s" in r.error)
    assert stale.error.startswith("no frame from camera 'camera' for ")


def test_namespace_with_the_package_params(launch):
    node = launch(namespace="robot1")
    assert node.fqn == "/robot1/mobilevlm_node"
    node.wait_for_state("active")
    defaults = declared_defaults()
    assert node.parameters(list(defaults)) == defaults
    assert_answers(node, rgb8(*SMALL, 3, fresh(node)), "/robot1/image")


def test_namespace_with_a_user_params_file_and_a_model_path_argument(launch, tmp_path, robot_model):
    """The user's file (keyed by the node's full name) applies in the namespace; the model_path argument, given,
    overrides it; the parameters neither sets keep their defaults."""
    params = write_params(tmp_path / "robot.yaml", "/robot1/mobilevlm_node",
                          {"model_path": "/nonexistent/model", "max_new_tokens": 3, "max_queue": 4})
    node = launch({"params_file": str(params), "model_path": str(robot_model)}, namespace="robot1")
    node.wait_for_state("active")
    values = node.parameters(["model_path", "max_new_tokens", "max_queue", "image_mode", "cameras"])
    assert values == {"model_path": str(robot_model), "max_new_tokens": 3, "max_queue": 4, "image_mode": "overview",
                      "cameras": ["camera"]}
    assert f"loading {robot_model} " in node.log()
    response = assert_answers(node, rgb8(*SMALL, 4, fresh(node)), "/robot1/image")
    assert response.generated_tokens <= 3


def test_a_user_params_file_wins_over_unset_arguments(launch, tmp_path, robot_model):
    """Issue 21's first defect: the file sets model_path, two cameras and their transports; with no launch arguments
    given, none of them may be replaced (configure failed with "camera_transports: 1 entries for 2 cameras")."""
    params = write_params(tmp_path / "robot.yaml", "/**", {
        "model_path": str(robot_model), "cameras": ["front", "rear"], "camera_topics": ["front/image", "rear/image"],
        "camera_transports": ["raw", "compressed"], "autostart": True, "use_sim_time": False})
    node = launch({"params_file": str(params)})
    node.wait_for_state("active")
    assert node.parameters(["model_path", "cameras", "camera_topics", "camera_transports"]) == {
        "model_path": str(robot_model), "cameras": ["front", "rear"], "camera_topics": ["front/image", "rear/image"],
        "camera_transports": ["raw", "compressed"]}
    assert_answers(node, rgb8(*SMALL, 5, fresh(node)), "/front/image", camera="front")
    assert_answers(node, jpeg(*SMALL, 6, fresh(node)), "/rear/image/compressed", camera="rear")


def test_use_compressed_with_a_camera_topic(launch):
    node = launch({"use_compressed": "true", "camera_topic": "/cam/color/image_raw"})
    node.wait_for_state("active")
    assert node.parameters(["camera_transports", "camera_topics"]) == {"camera_transports": ["compressed"],
                                                                      "camera_topics": ["image"]}
    assert_answers(node, jpeg(*SMALL, 7, fresh(node)), "/cam/color/image_raw/compressed")


def test_use_sim_time(launch):
    """Replaying a bag with `ros2 bag play --clock`: frames stamped in the bag's time are fresh on /clock's time."""
    from rclpy.qos import QoSProfile
    from rosgraph_msgs.msg import Clock

    node = launch({"use_sim_time": "true"}, namespace="replay")
    node.wait_for_state("active")
    assert node.parameters(["use_sim_time"]) == {"use_sim_time": True}
    clock = node.publisher(Clock, "/clock", QoSProfile(depth=1))

    def tick() -> None:
        clock.publish(Clock(clock=stamp(1000)))

    frame = rgb8(*SMALL, 8, stamp(999, 500_000_000))
    response = node.ask_about(frame, "/replay/image", between=tick)
    assert response.success and response.header.stamp == frame.header.stamp
    # Ten seconds old on the bag's clock: refused, with the age measured on that clock.
    old = rgb8(*SMALL, 9, stamp(990))
    stale = node.ask_about(old, "/replay/image", between=tick, accept=lambda r: not r.success and "max_frame_age_s" in r.error)
    assert stale.error.startswith("no frame from camera 'camera' for 10.0 s"), stale.error


def test_autostart_false_then_a_lifecycle_manager_configures_and_activates(launch):
    from lifecycle_msgs.msg import Transition

    from mobilevlm_interfaces.srv import VisualQuery

    node = launch({"autostart": "false"}, namespace="managed")
    assert node.parameters(["autostart"]) == {"autostart": False}
    assert node.state() == "unconfigured"
    assert node.call(node.vqa, VisualQuery.Request(question="Hi?")).error == "node is not configured"
    assert node.change_state(Transition.TRANSITION_CONFIGURE)
    assert node.state() == "inactive"
    assert node.change_state(Transition.TRANSITION_ACTIVATE)
    assert node.state() == "active"
    assert_answers(node, rgb8(*SMALL, 10, fresh(node)), "/managed/image")
    assert node.change_state(Transition.TRANSITION_DEACTIVATE)
    assert node.state() == "inactive"
    assert node.change_state(Transition.TRANSITION_ACTIVATE)
    assert_answers(node, rgb8(*SMALL, 11, fresh(node)), "/managed/image")


def fast_dds_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for wheel in ("ros-fastdds", "ros-fastrtps"):  # Fast DDS 3 (Kilted) and 2 (Jazzy) wheels
        try:
            return version(wheel)
        except PackageNotFoundError:
            pass
    return "unknown"


@pytest.mark.parametrize("size", [(720, 1280), (1080, 1920)], ids=["1280x720", "1920x1080"])
def test_large_raw_frames_published_once_arrive_with_the_profile(ros_context, installed, tmp_path, size, figures):
    """Raw frames published once, best effort (as a camera driver does), reach the node launched with its Fast DDS
    profile (32 MB shared-memory segment) 20 of 20 when the publisher's process has the profile too. Without it on
    the publisher's side, the count is measured and reported, not asserted (issue 21 measured 2-4 of 20)."""
    distro = distros()[-1]
    height, width = size
    node = LaunchedNode(ros_context, distro, tmp_path / "launch.log", namespace=f"large_{width}")
    try:
        node.wait_for_state("active")
        profile = str(Path(sys.prefix) / "share" / "mobilevlm_ros" / "config" / "fastdds_large_frames.xml")  # installed
        topic = f"{node.ns}/image"
        with_profile = frame_counts(distro, node.fqn, topic, width, height, {"FASTDDS_DEFAULT_PROFILES_FILE": profile})
        without = frame_counts(distro, node.fqn, topic, width, height, {"FASTDDS_DEFAULT_PROFILES_FILE": None}, patience_s=1.0)
        dds = f"Fast DDS {fast_dds_version()}"
        figures[f"large frames {width}x{height} rgb8 published once ({dds}): profile on both sides"] = f"{with_profile['arrived']}/20"
        figures[f"large frames {width}x{height} rgb8 published once ({dds}): profile on the node only"] = f"{without['arrived']}/20"
        assert node.stop() == 0, node.log()
        assert_node_stopped(node.log())
        if with_profile["arrived"] < 20 and fast_dds_version().startswith("2."):
            # Measured with Jazzy's wheels (Fast DDS 2.14): the profile loads, but its SHM transport keeps the 512 KB
            # default segment (only such a segment appears in /dev/shm), so frames are lost as without it.
            pytest.xfail(f"{dds} does not apply the profile's segment_size here: {with_profile['arrived']}/20 with it, "
                         f"{without['arrived']}/20 without")
        assert with_profile["arrived"] == with_profile["count"] == 20, with_profile
    finally:
        node.close()


@pytest.mark.parametrize("size", [(720, 1280), (1080, 1920)], ids=["1280x720", "1920x1080"])
def test_large_raw_frames_published_reliable_arrive_without_the_profile(ros_context, installed, tmp_path, size,
                                                                        figures):
    """A driver that publishes reliable: the node, launched without the Fast DDS profile (and left at qos_reliability
    auto), subscribes reliable in turn, and raw frames published once reach it 20 of 20 with no profile anywhere."""
    distro = distros()[-1]
    height, width = size
    no_profile = {"FASTDDS_DEFAULT_PROFILES_FILE": None}
    node = LaunchedNode(ros_context, distro, tmp_path / "launch.log", {"fastdds_profile": ""},
                        namespace=f"reliable_{width}", env=no_profile)
    try:
        node.wait_for_state("active")
        counts = frame_counts(distro, node.fqn, f"{node.ns}/image", width, height, no_profile, reliable=True)
        dds = f"Fast DDS {fast_dds_version()}"
        figures[f"large frames {width}x{height} rgb8 published once ({dds}): reliable, no profile"] = \
            f"{counts['arrived']}/20"
        assert node.stop() == 0, node.log()
        assert_node_stopped(node.log())
        assert counts["arrived"] == counts["count"] == 20, counts
    finally:
        node.close()
