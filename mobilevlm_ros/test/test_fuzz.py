"""Property-based fuzzing of everything a client or a camera can send: image conversion, and every request path of a
real node (~/vqa, ~/navigate, the ~/ask action, the ~/query topic, raw and compressed camera topics).

The property: each case ends in an answer or a specific error (never "internal error", which is an exception the
code did not expect), the executor and the inference worker stay alive, and diagnostics stay bounded. The number
of cases tried per path is reported as a figure. Case counts come from the hypothesis profile (conftest.py).
"""

import collections
import itertools
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from builtin_interfaces.msg import Time
from hypothesis import given, settings
from hypothesis import strategies as st
from rclpy.action import ActionClient
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from mobilevlm_interfaces.action import Ask
from mobilevlm_interfaces.msg import Answer
from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.errors import ImageError
from mobilevlm_ros.ros.diagnostics import error_kind
from mobilevlm_ros.ros.image_conversion import MAX_PIXELS, MAX_SIDE, compressed_to_rgb, image_to_rgb
from ros_harness import FRAME, Harness, encode, node_parameters

pytestmark = pytest.mark.reliability

UINT32_MAX = 2**32 - 1
# Bytes per pixel of each encoding sensor_msgs/image_encodings defines and the node supports (spelled out here, not
# taken from the module under test).
BYTES_PER_PIXEL = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2, "yuv422": 2, "yuv422_yuy2": 2,
                   "bayer_rggb8": 1, "bayer_bggr8": 1, "bayer_gbrg8": 1, "bayer_grbg8": 1, "8UC1": 1, "8UC3": 3}
MAX_DATA = 1 << 20  # messages are built up to 1 MB of pixel data
# Conversion is cheap: it gets this many times the examples of a path that talks to the node.
CONVERSION_FACTOR = 10


def scaled(factor: int) -> settings:
    return settings(max_examples=factor * settings().max_examples)


def random_bytes(seed: int, length: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


@st.composite
def raw_images(draw: Any) -> Image:
    """A consistent sensor_msgs/Image half the time; else one wrong in any of its encoding, size, step, data length."""
    encoding = draw(st.sampled_from(sorted(BYTES_PER_PIXEL)))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    width += width % 2 if encoding.startswith("yuv422") else 0
    step = width * BYTES_PER_PIXEL[encoding] + draw(st.integers(0, 16))
    length = step * height
    damage = draw(st.sets(st.sampled_from(["encoding", "width", "height", "step", "data"]), min_size=1)) if draw(st.booleans()) else set()
    if "encoding" in damage:
        encoding = draw(st.sampled_from(sorted(BYTES_PER_PIXEL)) | st.text(max_size=12))
    if "width" in damage:
        width = draw(st.integers(0, 64) | st.integers(0, UINT32_MAX))
    if "height" in damage:
        height = draw(st.integers(0, 64) | st.integers(0, UINT32_MAX))
    if "step" in damage:
        step = draw(st.integers(0, 256) | st.integers(0, UINT32_MAX))
    if "data" in damage or length > MAX_DATA:
        length = draw(st.integers(0, 4096))
    msg = Image(encoding=encoding, width=width, height=height, step=step, is_bigendian=draw(st.integers(0, 1)))
    msg.data = random_bytes(draw(st.integers(0, UINT32_MAX)), length)
    return msg


def is_consistent(msg: Image) -> bool:
    """Whether a correct converter must accept `msg`."""
    bpp = BYTES_PER_PIXEL.get(msg.encoding)
    return (bpp is not None and 0 < msg.width * msg.height <= MAX_PIXELS and max(msg.width, msg.height) <= MAX_SIDE
            and msg.step >= msg.width * bpp and len(msg.data) == msg.step * msg.height
            and not (bpp == 2 and msg.encoding != "mono16" and msg.width % 2))


@st.composite
def compressed_images(draw: Any) -> tuple[CompressedImage, bool]:
    """(message, whether it is an intact PNG/JPEG): garbage, real files with flipped bytes, cut short, or lying about
    their size in the header, and intact ones."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    pixels = np.frombuffer(random_bytes(draw(st.integers(0, 1000)), height * width * 3), np.uint8).reshape(height, width, 3)
    extension = draw(st.sampled_from([".png", ".jpg"]))
    ok, encoded = cv2.imencode(extension, pixels)
    assert ok
    data = bytearray(encoded.tobytes())
    damage = draw(st.sampled_from(["none", "garbage", "flip", "truncate", "header size", "signature only"]))
    if damage == "garbage":
        data = bytearray(random_bytes(draw(st.integers(0, 1000)), draw(st.integers(0, 2000))))
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "header size":  # PNG IHDR width/height, or the bytes right after the JPEG SOF0 marker
        offset = 16 if extension == ".png" else data.index(b"\xff\xc0") + 5
        data[offset : offset + 4] = draw(st.integers(0, UINT32_MAX)).to_bytes(4, "big")
    elif damage == "signature only":
        data = data[: 8 if extension == ".png" else 2] + random_bytes(draw(st.integers(0, 1000)), draw(st.integers(0, 200)))
    msg = CompressedImage(format=draw(st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8", ""]) | st.text(max_size=20)))
    msg.data = bytes(data)
    return msg, damage == "none"


class Outcomes:
    """Per-path count of the cases tried and how each ended, kept in the figures."""

    def __init__(self, figures: dict, path: str):
        self.counts = figures.setdefault(f"fuzz cases: {path}", collections.Counter())

    def record(self, success: bool, error: str) -> None:
        assert success or error, "a failed request must say why"
        assert not error.startswith("internal error"), f"an unexpected exception: {error}"
        self.counts["cases"] += 1
        self.counts["answered" if success else f"refused: {error_kind(error)}"] += 1


@scaled(CONVERSION_FACTOR)
@given(msg=raw_images())
def test_fuzz_image_conversion(figures, msg):
    try:
        rgb = image_to_rgb(msg)
    except ImageError as error:
        Outcomes(figures, "image_to_rgb").record(False, str(error))
        assert not is_consistent(msg), f"a consistent image was refused: {error}"
        return
    Outcomes(figures, "image_to_rgb").record(True, "")
    assert is_consistent(msg)
    assert rgb.shape == (msg.height, msg.width, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous


@scaled(CONVERSION_FACTOR)
@given(case=compressed_images())
def test_fuzz_compressed_conversion(figures, case):
    msg, intact = case
    try:
        rgb = compressed_to_rgb(msg)
    except ImageError as error:
        Outcomes(figures, "compressed_to_rgb").record(False, str(error))
        assert not intact, f"an intact image was refused: {error}"
        return
    Outcomes(figures, "compressed_to_rgb").record(True, "")
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8 and rgb.size > 0


# ---- the node -------------------------------------------------------------------------------------------------------

QUESTIONS = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=300),  # any Unicode a ROS string (UTF-8) can carry
    st.text(st.characters(max_codepoint=0x9F, categories=["Cc"]), max_size=50),  # control characters
    st.integers(2001, 1_000_000).map(lambda n: "?" * n),  # past max_question_chars, up to 1 MB
    st.sampled_from(["What is in the image?", "Is the door open?"]),
)
CAMERAS = st.sampled_from(["", "camera", "front"]) | st.text(max_size=30)
# Small limits mostly; the largest uint32 now and then, which only the context length and the timeout bound.
MAX_NEW_TOKENS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, UINT32_MAX])
# No image (the camera's frame) half the time, else a hostile or valid one in the request.
REQUEST_IMAGES = st.just(Image()) | raw_images()
ACTIONS = st.lists(st.sampled_from(["left", "right", "stop", " ", ""]) | st.text(max_size=20), max_size=8)


@pytest.fixture(scope="module")
def fuzz_node(ros_context, checkpoint) -> Iterator[Harness]:
    with Harness(ros_context, node_parameters(checkpoint, max_new_tokens=2, request_timeout_s=2.0), "fuzz") as h:
        h.activate()
        h.stamps = itertools.count(1)
        h.compressed_camera = h.client.create_publisher(CompressedImage, f"{h.ns}/front/image/compressed", qos_profile_sensor_data)
        # Watching ~/debug_image makes every answered request also draw its frame, question and answer: fuzzed too.
        h.client.create_subscription(Image, h.name("debug_image"), lambda msg: None, qos_profile_sensor_data)
        h.spin_until(lambda: h.node.debug_publisher.get_subscription_count() > 0, "debug image subscription")
        h.publish_frame(encode(FRAME, "rgb8", Time(sec=next(h.stamps))))
        yield h


def assert_still_serving(h: Harness) -> None:
    assert h.thread.is_alive(), "an exception escaped a callback and stopped the executor"
    assert h.node.worker is not None and h.node.worker.alive, "the inference worker died"
    # Hostile messages must not grow /diagnostics: errors are counted by a bounded set of kinds.
    assert len(h.node.stats.errors) < 40, sorted(h.node.stats.errors)


@given(question=QUESTIONS, camera=CAMERAS, image=REQUEST_IMAGES, max_new_tokens=MAX_NEW_TOKENS)
def test_fuzz_vqa(fuzz_node, figures, question, camera, image, max_new_tokens):
    request = VisualQuery.Request(question=question, camera=camera, image=image, max_new_tokens=max_new_tokens)
    response = fuzz_node.call(fuzz_node.vqa, request)
    Outcomes(figures, "~/vqa").record(response.success, response.error)
    assert_still_serving(fuzz_node)


@given(instruction=QUESTIONS, camera=CAMERAS, image=REQUEST_IMAGES, actions=ACTIONS)
def test_fuzz_navigate(fuzz_node, figures, instruction, camera, image, actions):
    request = NavigationInstruction.Request(instruction=instruction, camera=camera, image=image, actions=actions)
    response = fuzz_node.call(fuzz_node.navigate, request)
    Outcomes(figures, "~/navigate").record(response.success, response.error)
    if response.success:
        assert response.action in response.actions and len(response.scores) == len(response.actions)
    assert_still_serving(fuzz_node)


@pytest.fixture(scope="module")
def ask_client(fuzz_node) -> Iterator[ActionClient]:
    client = ActionClient(fuzz_node.client, Ask, fuzz_node.name("ask"))
    assert client.wait_for_server(timeout_sec=30)
    yield client
    client.destroy()


@given(question=QUESTIONS, camera=CAMERAS, image=REQUEST_IMAGES, max_new_tokens=MAX_NEW_TOKENS, cancel=st.booleans())
def test_fuzz_ask_action(fuzz_node, ask_client, figures, question, camera, image, max_new_tokens, cancel):
    goal = Ask.Goal(question=question, camera=camera, image=image, max_new_tokens=max_new_tokens)
    sent = ask_client.send_goal_async(goal)
    fuzz_node.spin_until(sent.done, "goal response")
    handle = sent.result()
    assert handle.accepted
    if cancel:
        handle.cancel_goal_async()
    result = handle.get_result_async()
    fuzz_node.spin_until(result.done, "ask result")
    status, answer = result.result().status, result.result().result
    expected = {GoalStatus.STATUS_SUCCEEDED: answer.success, GoalStatus.STATUS_ABORTED: not answer.success,
                GoalStatus.STATUS_CANCELED: cancel}
    assert expected.get(status), f"status {status} for {answer}"
    Outcomes(figures, "~/ask").record(answer.success, answer.error)
    assert_still_serving(fuzz_node)


@pytest.fixture(scope="module")
def query_topic(fuzz_node) -> tuple[Any, list[Answer]]:
    answers: list[Answer] = []
    fuzz_node.client.create_subscription(Answer, fuzz_node.name("answer"), answers.append, 10)
    query = fuzz_node.client.create_publisher(String, fuzz_node.name("query"), 10)
    fuzz_node.spin_until(lambda: query.get_subscription_count() > 0 and fuzz_node.node.answer_publisher.get_subscription_count() > 0,
                         "query and answer subscriptions")
    return query, answers


@given(question=QUESTIONS)
def test_fuzz_query_topic(fuzz_node, query_topic, figures, question):
    query, answers = query_topic
    before = len(answers)
    query.publish(String(data=question))
    fuzz_node.spin_until(lambda: len(answers) > before, "an answer on ~/answer")
    assert len(answers) == before + 1, "one query, one answer"
    Outcomes(figures, "~/query").record(answers[-1].success, answers[-1].error)
    assert_still_serving(fuzz_node)


@given(msg=raw_images(), question=st.sampled_from(["What is in the image?", "Colour?"]))
def test_fuzz_raw_camera(fuzz_node, query_topic, figures, msg, question):
    """Frames from the default camera, asked about on ~/query (whose answers are drawn on ~/debug_image)."""
    query, answers = query_topic
    msg.header.stamp = Time(sec=next(fuzz_node.stamps))
    fuzz_node.publish_frame(msg)
    before = len(answers)
    query.publish(String(data=question))
    fuzz_node.spin_until(lambda: len(answers) > before, "an answer on ~/answer")
    answer = answers[-1]
    Outcomes(figures, "camera (Image)").record(answer.success, answer.error)
    assert answer.success or not is_consistent(msg) or answer.error.startswith("timeout"), answer.error
    assert_still_serving(fuzz_node)


@given(case=compressed_images())
def test_fuzz_compressed_camera(fuzz_node, figures, case):
    msg, intact = case
    msg.header.stamp = Time(sec=next(fuzz_node.stamps))
    fuzz_node.publish_frame(msg, fuzz_node.compressed_camera, camera="front")
    response = fuzz_node.call(fuzz_node.vqa, VisualQuery.Request(question="What is in the image?", camera="front"))
    Outcomes(figures, "camera (CompressedImage)").record(response.success, response.error)
    assert response.success or not intact or response.error.startswith("timeout"), response.error
    assert_still_serving(fuzz_node)
