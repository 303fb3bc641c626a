"""mobilevlm_node's camera subscriptions: a reliability that matches the camera's publishers (qos_reliability auto,
read from the ROS graph), and the rates /diagnostics shows, with the warning when frames are being lost. The rule for
lost frames is checked on the frame store with arrival times of its own, then through real messages."""

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from mobilevlm_interfaces.srv import VisualQuery
from mobilevlm_ros.ros.frames import RATE_WINDOW, FrameStore
from mobilevlm_ros.ros.node import NODE_NAME
from ros_harness import FRAME, Harness, diagnostic_values, encode, node_parameters

RELIABLE = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
PERIOD_NS = 33_333_333  # a 30 Hz camera


def image(stamp_ns: int) -> Image:
    msg = Image()
    msg.header.stamp = Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
    return msg


def store_frames(indices: list[int], stamped: bool = True) -> FrameStore:
    """A store that received the frames of a 30 Hz camera with these indices, each 5 ms after its capture."""
    store = FrameStore(["front"])
    for index in indices:
        store.put("front", image(index * PERIOD_NS if stamped else 0), index * PERIOD_NS + 5_000_000)
    return store


def test_every_frame_arriving_is_no_loss():
    stats = store_frames(list(range(1, 41))).snapshot()["front"]
    assert stats.received_hz == pytest.approx(30, rel=1e-6) and stats.camera_hz == pytest.approx(30, rel=1e-6)
    assert stats.losing_frames() == ""


@pytest.mark.parametrize("kept", [0.4, 0.2, 0.05])
def test_most_frames_lost_is_a_loss_whatever_the_share(kept):
    """8 of 20 frames arriving (issue 21's 640x480 figure) down to 1 of 20: the stamps still show the camera's rate."""
    indices = sorted(np.random.default_rng(1).choice(np.arange(1, 2000), size=int(kept * 2000), replace=False))
    stats = store_frames(list(indices)).snapshot()["front"]
    assert stats.received_hz < 0.5 * stats.camera_hz
    assert stats.losing_frames().startswith(f"camera 'front' receives {stats.received_hz:.1f} frames/s of the ")


def test_no_rate_without_stamps_or_with_too_few_frames():
    assert store_frames(list(range(1, 41)), stamped=False).snapshot()["front"].camera_hz is None
    assert store_frames([1, 2]).snapshot()["front"].received_hz is None
    assert store_frames([1, 2]).snapshot()["front"].losing_frames() == ""


def subscription_reliability(h: Harness, topic: str) -> ReliabilityPolicy | None:
    """The reliability of the node's subscription to `topic`, as the ROS graph shows it."""
    infos = [info for info in h.client.get_subscriptions_info_by_topic(topic) if info.node_name == NODE_NAME]
    return infos[0].qos_profile.reliability if infos else None


THREE_CAMERAS = {"cameras": ["camera", "front", "rear"], "camera_topics": ["image", "front/image", "rear/image"],
                 "camera_transports": ["raw", "compressed", "raw"]}


def test_auto_matches_each_cameras_publishers_and_follows_a_camera_that_starts_later(ros_context, checkpoint):
    """camera: the harness's best-effort publisher; front: a reliable driver; rear: none when the node activates,
    then a reliable one (the node re-subscribes within the check period)."""
    with Harness(ros_context, node_parameters(checkpoint, **THREE_CAMERAS), "auto_qos") as h:
        front = h.client.create_publisher(CompressedImage, f"{h.ns}/front/image/compressed", RELIABLE)
        h.spin_until(lambda: h.node.count_publishers("front/image/compressed") and h.node.count_publishers("image"),
                     "the node to see the publishers")
        h.activate()
        expected = {"front/image/compressed": ReliabilityPolicy.RELIABLE, "image": ReliabilityPolicy.BEST_EFFORT,
                    "rear/image": ReliabilityPolicy.BEST_EFFORT}
        h.spin_until(lambda: all(subscription_reliability(h, f"{h.ns}/{topic}") == reliability
                                 for topic, reliability in expected.items()),
                     "front reliable, camera and rear best effort")
        assert front.get_subscription_count() == 1
        rear = h.client.create_publisher(Image, f"{h.ns}/rear/image", RELIABLE)
        h.spin_until(lambda: subscription_reliability(h, f"{h.ns}/rear/image") == ReliabilityPolicy.RELIABLE,
                     "rear re-subscribed reliable")
        h.publish_frame(encode(FRAME, "rgb8", Time(sec=5)), rear, camera="rear")
        response = h.call(h.vqa, VisualQuery.Request(question="What is behind?", camera="rear"))
        assert response.success and (response.camera, response.header.stamp.sec) == ("rear", 5)


@pytest.mark.parametrize("setting, publisher_qos, expected", [
    ("reliable", qos_profile_sensor_data, ReliabilityPolicy.RELIABLE),
    ("best_effort", RELIABLE, ReliabilityPolicy.BEST_EFFORT),
])
def test_an_explicit_reliability_is_kept(ros_context, checkpoint, setting, publisher_qos, expected):
    with Harness(ros_context, node_parameters(checkpoint, qos_reliability=setting), f"explicit_{setting}") as h:
        h.client.create_publisher(Image, f"{h.ns}/image", publisher_qos)
        h.activate()
        h.spin_until(lambda: subscription_reliability(h, f"{h.ns}/image") == expected, f"a {setting} subscription")


def test_diagnostics_show_the_rates_and_warn_when_frames_are_lost(ros_context, checkpoint):
    """Frames stamped 1 ms apart (a 1 kHz camera) arrive at the pace this test publishes them, far slower: the status
    warns that frames are being lost, and shows both rates."""
    with Harness(ros_context, node_parameters(checkpoint), "rates") as h:
        h.activate()
        statuses: list[DiagnosticStatus] = []
        h.client.create_subscription(DiagnosticArray, "/diagnostics", lambda msg: statuses.extend(
            s for s in msg.status if s.name == f"{h.ns}/{NODE_NAME}: inference"), 10)
        for index in range(RATE_WINDOW):
            h.publish_frame(encode(FRAME, "rgb8", Time(sec=100, nanosec=index * 1_000_000)))
        h.spin_until(lambda: statuses and "frames are being lost" in statuses[-1].message, "the lost-frames warning")
        status = statuses[-1]
        values = diagnostic_values(status)
        assert status.level == DiagnosticStatus.WARN
        assert float(values["camera camera: stamped (Hz)"]) == pytest.approx(1000, rel=1e-3)
        assert 0 < float(values["camera camera: received (Hz)"]) < 500
        assert values["camera camera: subscription"] == "best effort"  # as the harness's camera publisher
        assert status.message.startswith("camera 'camera' receives ")
