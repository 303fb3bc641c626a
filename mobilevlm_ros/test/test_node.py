"""mobilevlm_node with the tiny checkpoint, through real rclpy messages: cameras, services, action, topics, lifecycle.

The node spins on its own executor thread; the test talks to it from a client node, exactly as another process
would. Answers are compared with the library's own answer for the same frame (the model is greedy, so deterministic).
"""

import signal
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import torch
from action_msgs.msg import GoalStatus
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State
from rcl_interfaces.msg import Log
from rclpy.action import ActionClient
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from mobilevlm_interfaces.action import Ask
from mobilevlm_interfaces.msg import Answer
from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.ros.parameters import SPECS
from mobilevlm_ros.runtime.navigation import NAVIGATION_ACTIONS, navigation_question
from mobilevlm_ros.runtime.vlm import MobileVLM
from ros_harness import (
    DEFAULT_CAMERA,
    FRAME,
    FRAME_ID,
    MAX_NEW_TOKENS,
    PROCESS_TIMEOUT_S,
    TIMEOUT_S,
    Harness,
    ProcessClient,
    diagnostic_values,
    encode,
    node_parameters,
    stamp,
    start_node_process,
)
from tiny_checkpoint import IMAGE_TOKENS

DEFAULTS = {spec.name: spec.default for spec in SPECS}


@pytest.fixture(scope="module")
def harness(ros_context, checkpoint) -> Iterator[Harness]:
    with Harness(ros_context, node_parameters(checkpoint), "main") as h:
        yield h.activate()


def test_vqa_answers_about_the_latest_frame(harness, vlm):
    harness.publish_frame(encode(FRAME, "rgb8", stamp(100)))
    response = harness.call(harness.vqa, VisualQuery.Request(question="What is in the image?"))
    assert response.success, response.error
    assert response.answer == vlm.ask(FRAME, "What is in the image?", max_new_tokens=MAX_NEW_TOKENS)
    assert (response.header.stamp.sec, response.header.stamp.nanosec, response.header.frame_id) == (100, 123, FRAME_ID)
    assert response.camera == DEFAULT_CAMERA
    assert response.generated_tokens <= MAX_NEW_TOKENS and response.prompt_tokens > IMAGE_TOKENS
    assert response.latency_s > 0


@pytest.mark.parametrize("encoding, pad",
                         [("rgb8", 0), ("rgb8", 5), ("bgr8", 0), ("rgba8", 3), ("bgra8", 0), ("8UC3", 1)])
def test_lossless_encodings_give_the_rgb_answer(harness, vlm, encoding, pad):
    harness.publish_frame(encode(FRAME, encoding, stamp(200 + pad), pad=pad))
    response = harness.call(harness.vqa, VisualQuery.Request(question="What colour?"))
    assert response.success, response.error
    assert response.answer == vlm.ask(FRAME, "What colour?", max_new_tokens=MAX_NEW_TOKENS)
    assert response.header.stamp.sec == 200 + pad


@pytest.mark.parametrize("encoding", ["mono8", "mono16", "yuv422", "yuv422_yuy2", "bayer_rggb8", "8UC1"])
def test_other_encodings_are_answered(harness, encoding):
    harness.publish_frame(encode(FRAME, encoding, stamp(300)))
    response = harness.call(harness.vqa, VisualQuery.Request(question="What colour?"))
    assert response.success, response.error
    assert response.header.stamp.sec == 300


def test_compressed_camera(harness, vlm):
    publisher = harness.client.create_publisher(CompressedImage, f"{harness.ns}/front/image/compressed", qos_profile_sensor_data)
    ok, png = cv2.imencode(".png", FRAME[:, :, ::-1])
    msg = CompressedImage(format="png", data=png.tobytes())
    msg.header.stamp = stamp(400)
    harness.publish_frame(msg, publisher, camera="front")
    response = harness.call(harness.vqa, VisualQuery.Request(question="What colour?", camera="front"))
    assert response.success, response.error
    assert (response.camera, response.header.stamp.sec) == ("front", 400)
    assert response.answer == vlm.ask(FRAME, "What colour?", max_new_tokens=MAX_NEW_TOKENS)


def test_image_in_the_request(harness, vlm):
    image = encode(FRAME[::-1].copy(), "bgr8", stamp(500))
    response = harness.call(harness.vqa, VisualQuery.Request(question="What colour?", image=image, max_new_tokens=4))
    assert response.success, response.error
    assert response.answer == vlm.ask(FRAME[::-1].copy(), "What colour?", max_new_tokens=4)
    assert response.header.stamp.sec == 500
    assert response.generated_tokens <= 4


def test_navigate_chooses_one_of_the_actions(harness, vlm):
    harness.publish_frame(encode(FRAME, "rgb8", stamp(600)))
    response = harness.call(harness.navigate, NavigationInstruction.Request(instruction="Go to the red door."))
    assert response.success, response.error
    assert list(response.actions) == list(NAVIGATION_ACTIONS)
    assert response.action in response.actions
    assert len(response.scores) == len(NAVIGATION_ACTIONS) and 0 < response.confidence <= 1
    assert response.action == response.actions[int(np.argmax(response.scores))]
    expected = vlm.session(FRAME).choose(navigation_question("Go to the red door.", NAVIGATION_ACTIONS), list(NAVIGATION_ACTIONS))
    assert response.action == expected.option
    custom = harness.call(harness.navigate, NavigationInstruction.Request(instruction="Go.", actions=["left", "right"]))
    assert custom.success and custom.action in ("left", "right") and list(custom.actions) == ["left", "right"]


def test_ask_action_streams_feedback(harness, vlm):
    harness.publish_frame(encode(FRAME, "rgb8", stamp(700)))
    client = ActionClient(harness.client, Ask, harness.name("ask"))
    try:
        feedback: list[str] = []
        handle = harness.send_ask_goal(client, Ask.Goal(question="Describe it.", max_new_tokens=8), feedback)
        result = harness.ask_result(handle)
        assert result.status == GoalStatus.STATUS_SUCCEEDED, result.result.error
        assert result.result.answer == vlm.ask(FRAME, "Describe it.", max_new_tokens=8)
        assert (result.result.header.stamp.sec, result.result.header.frame_id) == (700, FRAME_ID)
        assert all(result.result.answer.startswith(text) for text in feedback)
    finally:
        client.destroy()


def test_ask_action_can_be_canceled_mid_stream(harness):
    harness.publish_frame(encode(FRAME, "rgb8", stamp(800)))
    client = ActionClient(harness.client, Ask, harness.name("ask"))
    try:
        feedback: list[str] = []
        handle = harness.send_ask_goal(client, Ask.Goal(question="Describe everything in detail.", max_new_tokens=800), feedback)
        harness.spin_until(lambda: len(feedback) > 0, "first feedback")
        cancel = handle.cancel_goal_async()
        harness.spin_until(cancel.done, "cancel response")
        result = harness.ask_result(handle)
        assert result.status == GoalStatus.STATUS_CANCELED
        assert not result.result.success and result.result.error == "canceled"
        assert result.result.generated_tokens < 800
    finally:
        client.destroy()
    assert harness.call(harness.vqa, VisualQuery.Request(question="Still there?")).success


def test_query_topic_publishes_numbered_answers_with_the_frames_header(harness, vlm):
    answers: list[Answer] = []
    harness.client.create_subscription(Answer, harness.name("answer"), answers.append, 10)
    query = harness.client.create_publisher(String, harness.name("query"), 10)
    harness.publish_frame(encode(FRAME, "rgb8", stamp(900)))
    harness.spin_until(lambda: query.get_subscription_count() > 0, "query subscription")
    query.publish(String(data="What is in the image?"))
    query.publish(String(data=""))  # refused at once: it may overtake the first, and its number says which it is
    harness.spin_until(lambda: len(answers) == 2, "two answers")
    answer, refused = sorted(answers, key=lambda a: a.query_id)
    assert refused.query_id == answer.query_id + 1
    assert answer.success, answer.error
    assert answer.answer == vlm.ask(FRAME, "What is in the image?", max_new_tokens=MAX_NEW_TOKENS)
    assert (answer.header.stamp.sec, answer.header.frame_id, answer.camera) == (900, FRAME_ID, DEFAULT_CAMERA)
    assert (refused.success, refused.error, refused.question) == (False, "question is empty", "")


def test_debug_images_reach_a_viewer_that_subscribes_later(harness):
    """~/debug_image is reliable, transient local, depth 1: RViz2's Image display (here its QoS) gets the last one
    even when it subscribes after the answer; ~/debug_image/compressed is the same picture as jpeg, for Foxglove."""
    viewer_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    raw: list[Image] = []
    jpeg: list[CompressedImage] = []
    create = harness.client.create_subscription
    subscriptions = [create(Image, harness.name("debug_image"), raw.append, viewer_qos),
                     create(CompressedImage, harness.name("debug_image/compressed"), jpeg.append, viewer_qos)]
    harness.spin_until(lambda: harness.node.debug_publisher.get_subscription_count() and
                       harness.node.debug_compressed_publisher.get_subscription_count(), "debug image subscriptions")
    harness.publish_frame(encode(FRAME, "rgb8", stamp(950)))
    assert harness.call(harness.vqa, VisualQuery.Request(question="What is in the image?")).success
    harness.spin_until(lambda: raw and jpeg, "the debug images")
    for subscription in subscriptions:
        harness.client.destroy_subscription(subscription)
    late: list[Image] = []
    harness.client.create_subscription(Image, harness.name("debug_image"), late.append, viewer_qos)
    harness.spin_until(lambda: late, "the last debug image, for a viewer that came later")
    for image in (raw[-1], late[0]):
        assert (image.width, image.height, image.encoding, image.header.stamp.sec, image.header.frame_id) == (
            FRAME.shape[1], FRAME.shape[0], "rgb8", 950, FRAME_ID)
    assert (jpeg[-1].format, jpeg[-1].header.stamp.sec) == ("rgb8; jpeg compressed bgr8", 950)
    decoded = cv2.imdecode(np.frombuffer(bytes(jpeg[-1].data), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == FRAME.shape


def test_library_log_records_reach_rosout(ros_context, checkpoint):
    """The library's Python logging (here: the model loader's line) is written through the node's logger to /rosout."""
    with Harness(ros_context, node_parameters(checkpoint), "rosout") as h:
        records: list[Log] = []
        subscription = h.client.create_subscription(Log, "/rosout", records.append, QoSProfile(depth=100))
        h.spin_until(lambda: subscription.get_publisher_count() > 0, "the rosout publishers")
        h.activate()
        def loaded() -> list[Log]:  # other nodes in this process write the records too, by their own names
            return [record for record in records
                    if record.name == "rosout.mobilevlm_node" and "[mobilevlm_ros.runtime.vlm] loaded " in record.msg]

        h.spin_until(loaded, "the loader's record on /rosout")
        assert loaded()[0].level == Log.INFO


def bad_image(kind: str) -> Image:
    image = encode(FRAME, "rgb8", stamp(1))
    if kind == "step":
        image.step = 10
    elif kind == "encoding":
        image.encoding = "32FC1"
    elif kind == "truncated":
        image.data = image.data[:100]
    return image


@pytest.mark.parametrize("request_fields, error", [
    (dict(question=""), "question is empty"),
    (dict(question="   "), "question is empty"),
    (dict(question="x" * 3000), "question is 3000 characters; the limit is 2000"),
    (dict(question="Hi?", camera="rear"), "unknown camera 'rear' (cameras: camera, front)"),
    (dict(question="Hi?", image=bad_image("step")), "step 10 is less than width 64 x 3 bytes per pixel"),
    (dict(question="Hi?", image=bad_image("encoding")), "unsupported image encoding '32FC1'"),
    (dict(question="Hi?", image=bad_image("truncated")), "data is 100 bytes; step 192 x height 48 needs 9216"),
])
def test_bad_requests_get_specific_errors_and_the_node_keeps_serving(harness, request_fields, error):
    harness.publish_frame(encode(FRAME, "rgb8", stamp(1000)))
    response = harness.call(harness.vqa, VisualQuery.Request(**request_fields))
    assert not response.success
    assert error in response.error
    assert harness.call(harness.vqa, VisualQuery.Request(question="And now?")).success


def test_bad_navigation_instruction(harness):
    response = harness.call(harness.navigate, NavigationInstruction.Request(instruction=" "))
    assert not response.success and response.error == "instruction is empty"
    response = harness.call(harness.navigate, NavigationInstruction.Request(instruction="Go.", actions=["left", "left"]))
    assert not response.success and "options repeat" in response.error


def test_no_frame_yet_and_stale_frames(ros_context, checkpoint):
    with Harness(ros_context, node_parameters(checkpoint, max_frame_age_s=0.5), "stale") as h:
        h.activate()
        response = h.call(h.vqa, VisualQuery.Request(question="Hi?"))
        assert (response.success, response.error) == (False, "no frame from camera 'camera' yet")
        old = h.node.get_clock().now().nanoseconds // 1_000_000_000 - 10
        h.publish_frame(encode(FRAME, "rgb8", Time(sec=old)))
        response = h.call(h.vqa, VisualQuery.Request(question="Hi?"))
        assert not response.success
        assert response.error.startswith("no frame from camera 'camera' for 1") and "max_frame_age_s is 0.5" in response.error
        h.publish_frame(encode(FRAME, "rgb8", h.node.get_clock().now().to_msg()))
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).success


def test_full_queue_answers_busy_at_once(ros_context, checkpoint):
    with Harness(ros_context, node_parameters(checkpoint, max_queue=1, max_new_tokens=300), "busy") as h:
        h.activate()
        h.publish_frame(encode(FRAME, "rgb8", stamp(1100)))
        assert h.vqa.wait_for_service(timeout_sec=TIMEOUT_S)
        futures = [h.vqa.call_async(VisualQuery.Request(question=f"Question {i}?")) for i in range(6)]
        h.spin_until(lambda: all(f.done() for f in futures), "all responses", timeout_s=120)
        errors = [f.result().error for f in futures if not f.result().success]
        assert "busy: queue full (1)" in errors
        assert any(f.result().success for f in futures)


def test_lifecycle_transitions(ros_context, checkpoint):
    with Harness(ros_context, node_parameters(checkpoint), "lifecycle") as h:
        node = h.node
        assert node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.vlm is not None and node.worker is None
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        h.publish_frame(encode(FRAME, "rgb8", stamp(1200)))
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).success
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.worker is None
        refused = h.call(h.vqa, VisualQuery.Request(question="Hi?"))  # the service stays, and says why it refuses
        assert (refused.success, refused.error) == (False, "node is not active")
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        h.publish_frame(encode(FRAME, "rgb8", stamp(1201)))
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).success
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert node.vlm is None
        assert node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).error == "node is not configured"


def test_bad_model_path_leaves_the_node_unconfigured_with_the_error_in_diagnostics(ros_context, tmp_path):
    with Harness(ros_context, {"model_path": str(tmp_path / "missing")}, "broken") as h:
        statuses: list[DiagnosticArray] = []
        h.client.create_subscription(DiagnosticArray, "/diagnostics", statuses.append, 10)
        assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert h.node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED

        def reported() -> bool:
            return any("missing: not a directory" in s.message for a in statuses for s in a.status)

        h.spin_until(reported, "diagnostics with the configure error", timeout_s=10)


def test_diagnostics_report_cameras_queue_and_latency(harness):
    statuses: list[DiagnosticArray] = []
    harness.client.create_subscription(DiagnosticArray, "/diagnostics", statuses.append, 10)
    harness.publish_frame(encode(FRAME, "rgb8", stamp(1300)))
    assert harness.call(harness.vqa, VisualQuery.Request(question="Hi?")).success
    harness.spin_until(lambda: any(s.message == "serving" for a in statuses for s in a.status), "diagnostics", timeout_s=10)
    status = next(s for a in statuses for s in a.status if s.message == "serving")
    values = {v.key: v.value for v in status.values}
    assert values["lifecycle state"] == "active"
    assert values["language backend"] == "torch"
    assert int(values["camera camera: frames"]) > 0
    assert values["camera front: age (s)"] in ("no frame yet",) or float(values["camera front: age (s)"]) >= 0
    assert {"queue depth", "latency p50 (s)", "latency p95 (s)", "answered", "errors"} <= values.keys()


def test_declared_parameters_have_descriptions(harness):
    for spec in SPECS:
        assert harness.node.describe_parameter(spec.name).description.startswith(spec.description)
        assert harness.node.get_parameter(spec.name).value is not None


def test_parameters_that_change_at_once_are_used_by_the_next_request(harness):
    old = encode(FRAME, "rgb8", stamp(1600))  # stamped 1970: older than any limit
    harness.publish_frame(old)
    try:
        assert harness.set_parameter("max_frame_age_s", 1.0).successful
        response = harness.call(harness.vqa, VisualQuery.Request(question="Hi?"))
        assert not response.success and "(max_frame_age_s is 1)" in response.error
        assert harness.set_parameter("temperature", 0.5).successful
        assert harness.node.params.temperature == 0.5
    finally:
        assert harness.set_parameter("max_frame_age_s", 0.0).successful
        assert harness.set_parameter("temperature", DEFAULTS["temperature"]).successful
    assert harness.call(harness.vqa, VisualQuery.Request(question="Hi?")).success


def test_configure_time_parameters_are_refused_while_configured(harness):
    refused = harness.set_parameter("max_queue", 16)
    assert (refused.successful, refused.reason) == (
        False, "parameter max_queue is read at configure: set it while the node is unconfigured")
    assert harness.node.get_parameter("max_queue").value == harness.node.params.max_queue == DEFAULTS["max_queue"]
    assert harness.set_parameter("max_queue", DEFAULTS["max_queue"]).successful  # the value it has: a params file loaded again
    assert not harness.set_parameter("temperature", 5.0).successful  # rclpy's range check
    assert "read-only" in harness.set_parameter("autostart", False).reason


def test_parameters_set_before_configure_are_checked_by_the_configure_rules(ros_context, checkpoint):
    with Harness(ros_context, node_parameters(checkpoint), "unconfigured") as h:
        refused = h.set_parameter("image_mode", "crop")
        assert (refused.successful, refused.reason) == (False, "parameter image_mode: 'crop' is not one of overview, tiles, per_tile")
        assert not h.set_parameter("cameras", ["front", "front"]).successful
        assert h.set_parameter("cameras", ["front", "rear", "top"]).successful  # its topics may follow: checked at configure
        assert h.node.params.cameras == ["front", "rear", "top"]
        assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert h.node.configure_error == "parameter camera_topics: 2 entries for 3 cameras"


@pytest.mark.reliability
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_console_script_serves_then_exits_cleanly_on_a_signal(ros_context, make_checkpoint, tmp_path, signum, figures):
    """A signal while the worker generates and more requests of every kind wait: each is answered or fails with
    "node is shutting down", and the process exits with 0 (the waits are bounds against a hang, not measurements).

    The long answer must outlast the wait for the queue to show in diagnostics on a loaded machine: with the usual 1024
    context it is done in about a second, so this checkpoint has room for 8000 tokens (tens of seconds of generating).
    """
    checkpoint = make_checkpoint(dtype=torch.float32, context_length=8192)
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu")
    namespace = f"process_{signum.name.lower()}"
    process = start_node_process(checkpoint, namespace, tmp_path / "node.log", max_new_tokens=4, diagnostics_period_s=0.1)
    client = ProcessClient(ros_context, namespace)
    try:
        assert client.vqa.wait_for_service(timeout_sec=PROCESS_TIMEOUT_S), (tmp_path / "node.log").read_text()
        first = client.answer_first(encode(FRAME, "rgb8", stamp(1400)), "What is in the image?")
        assert first.success, first.error
        assert first.answer == vlm.ask(FRAME, "What is in the image?", max_new_tokens=4)
        assert first.header.stamp.sec == 1400

        feedback: list[str] = []
        running = client.ask.send_goal_async(Ask.Goal(question="Describe it all.", max_new_tokens=8000),
                                             feedback_callback=lambda m: feedback.append(m.feedback.partial_answer))
        client.spin_until(lambda: running.done() and feedback, "the worker generating the long answer")
        queued = [client.vqa.call_async(VisualQuery.Request(question=f"Queued {i}?")) for i in range(3)]
        queued += [client.navigate.call_async(NavigationInstruction.Request(instruction="Go.")) for _ in range(2)]
        client.spin_until(lambda: any(diagnostic_values(s).get("queue depth") == "5" for s in client.diagnostics),
                          "five requests queued (diagnostics)")
        process.send_signal(signum)
        signalled = time.monotonic()
        result = running.result().get_result_async()
        client.spin_until(lambda: result.done() and all(f.done() for f in queued), "every response")
        responses = [f.result() for f in queued] + [result.result().result]
        assert all(r.success or r.error == "node is shutting down" for r in responses), [r.error for r in responses]
        assert result.result().status == GoalStatus.STATUS_ABORTED
        assert process.wait(timeout=PROCESS_TIMEOUT_S) == 0, (tmp_path / "node.log").read_text()
        figures[f"signal exit s: {signum.name}"] = round(time.monotonic() - signalled, 3)
    finally:
        if process.poll() is None:
            process.kill()
        client.destroy()


def test_onnxruntime_vision_backend_gives_the_torch_answer(ros_context, checkpoint, vlm, tmp_path):
    """Under the node's default engine_build (never) a missing graph fails configure with the command that builds it;
    with if_missing, set while unconfigured, configure builds it."""
    parameters = node_parameters(checkpoint, vision_backend="onnxruntime", engines_dir=str(tmp_path))
    del parameters["engine_build"]
    with Harness(ros_context, parameters, "onnx") as h:
        assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert "mobilevlm build" in h.node.configure_error and "--vision onnx " in h.node.configure_error, h.node.configure_error
        assert not list(tmp_path.iterdir())
        assert h.set_parameter("engine_build", "if_missing").successful
        h.activate()
        assert h.node.vlm.vision.name == "onnxruntime" and list(tmp_path.glob("vision-onnx-*.onnx"))
        h.publish_frame(encode(FRAME, "rgb8", stamp(1500)))
        response = h.call(h.vqa, VisualQuery.Request(question="What colour?"))
        assert response.success, response.error
        assert response.answer == vlm.ask(FRAME, "What colour?", max_new_tokens=MAX_NEW_TOKENS)
