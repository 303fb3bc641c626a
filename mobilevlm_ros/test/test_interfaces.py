"""The generated mobilevlm_interfaces types work end to end through rclpy, in one process.

Covers the build of mobilevlm_interfaces (rosidl C/C++/Python type support against the ROS 2
wheels) and its use: a VisualQuery service call, an Ask action with streamed feedback and an
Answer topic message, each between two nodes. Every wait is bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from builtin_interfaces.msg import Time
from rclpy.action import ActionClient, ActionServer
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from rclpy.task import Future
from sensor_msgs.msg import Image

from mobilevlm_interfaces.action import Ask
from mobilevlm_interfaces.msg import Answer
from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.choices import IMAGE_MODES
from mobilevlm_ros.runtime.navigation import NAVIGATION_ACTIONS
from ros_harness import spin_until

TIMEOUT_S = 10.0


@pytest.fixture()
def nodes(ros_context: Context) -> Iterator[tuple[Node, Node, MultiThreadedExecutor]]:
    """A server node and a client node, both on one executor."""
    server = Node("interfaces_test_server", context=ros_context)
    client = Node("interfaces_test_client", context=ros_context)
    executor = MultiThreadedExecutor(num_threads=2, context=ros_context)
    executor.add_node(server)
    executor.add_node(client)
    yield server, client, executor
    executor.shutdown(timeout_sec=TIMEOUT_S)
    server.destroy_node()
    client.destroy_node()


def wait_future(executor: MultiThreadedExecutor, future: Future, what: str) -> Any:
    """Spin until `future` is done and return its result; fail after TIMEOUT_S."""
    executor.spin_until_future_complete(future, timeout_sec=TIMEOUT_S)
    assert future.done(), f"timed out waiting for {what}"
    return future.result()


def make_image(stamp: Time) -> Image:
    image = Image(height=2, width=3, encoding="rgb8", step=9, data=bytes(range(18)))
    image.header.stamp = stamp
    image.header.frame_id = "camera_optical"
    return image


def test_interface_fields() -> None:
    """The interfaces keep the fields the node and its clients rely on."""
    assert set(VisualQuery.Request.get_fields_and_field_types()) == {
        "question", "camera", "image", "max_new_tokens", "mode", "roi",
    }
    assert set(VisualQuery.Response.get_fields_and_field_types()) == {
        "success", "answer", "error", "header", "camera", "latency_s",
        "prompt_tokens", "generated_tokens",
    }
    for response in (VisualQuery.Response, NavigationInstruction.Response, Ask.Result):
        assert response.get_fields_and_field_types()["header"] == "std_msgs/Header"
    assert set(NavigationInstruction.Request.get_fields_and_field_types()) == {
        "instruction", "camera", "image", "actions",
    }
    response = NavigationInstruction.Response(
        success=True, action="stop", confidence=0.5, actions=["move_forward", "stop"], scores=[-2.0, -1.5],
    )
    assert list(response.actions) == ["move_forward", "stop"]
    assert list(response.scores) == [-2.0, -1.5]
    assert set(Ask.Goal.get_fields_and_field_types()) == set(VisualQuery.Request.get_fields_and_field_types())
    assert set(Ask.Result.get_fields_and_field_types()) == set(VisualQuery.Response.get_fields_and_field_types())
    assert set(Ask.Feedback.get_fields_and_field_types()) == {"partial_answer", "generated_tokens"}
    assert set(Answer.get_fields_and_field_types()) == {
        "query_id", "header", "camera", "question", "answer", "success", "error", "latency_s",
    }


def constants(interface: Any, prefix: str) -> list[str]:
    """The values of `interface`'s constants named PREFIX_*, in the order the file defines them (rosidl makes each a
    property of the message's metaclass)."""
    return [getattr(interface, name) for name in vars(type(interface)) if name.startswith(prefix)]


def test_constants_are_the_librarys_choices() -> None:
    """The image modes and default actions in the interfaces are the library's own, so the two cannot drift apart."""
    assert constants(VisualQuery.Request, "MODE_") == list(IMAGE_MODES)
    assert constants(Ask.Goal, "MODE_") == list(IMAGE_MODES)
    assert constants(NavigationInstruction.Request, "ACTION_") == list(NAVIGATION_ACTIONS)


def test_visual_query_service_round_trip(nodes: tuple[Node, Node, MultiThreadedExecutor]) -> None:
    server, client, executor = nodes

    def answer(request: VisualQuery.Request, response: VisualQuery.Response) -> VisualQuery.Response:
        image = request.image
        response.success = True
        response.answer = f"{request.question} -> {image.width}x{image.height} {image.encoding}"
        response.header = image.header
        response.camera = request.camera or "front"
        response.latency_s = 0.25
        response.prompt_tokens = 150
        response.generated_tokens = request.max_new_tokens
        return response

    server.create_service(VisualQuery, "visual_query", answer)
    cli = client.create_client(VisualQuery, "visual_query")
    assert cli.wait_for_service(timeout_sec=TIMEOUT_S), "VisualQuery service never appeared"

    stamp = Time(sec=12, nanosec=345)
    request = VisualQuery.Request(question="what is on the table?", image=make_image(stamp), max_new_tokens=7)
    response = wait_future(executor, cli.call_async(request), "VisualQuery response")

    assert response.success
    assert response.error == ""
    assert response.answer == "what is on the table? -> 3x2 rgb8"
    assert response.camera == "front"
    header = response.header
    assert (header.stamp.sec, header.stamp.nanosec, header.frame_id) == (12, 345, "camera_optical")
    assert response.latency_s == pytest.approx(0.25)
    assert (response.prompt_tokens, response.generated_tokens) == (150, 7)


def test_ask_action_round_trip_with_feedback(nodes: tuple[Node, Node, MultiThreadedExecutor]) -> None:
    server, client, executor = nodes
    words = ["a", "red", "cup"]
    # Feedback is a topic: with the default volatile QoS, feedback published before DDS has matched the
    # client's subscription (which can lag the graph that wait_for_server sees) is lost. Transient-local
    # on both ends replays it to the late subscription, so the test checks every message deterministically.
    feedback_qos = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)

    def execute(goal_handle) -> Ask.Result:  # noqa: ANN001 (rclpy's ServerGoalHandle)
        for count in range(1, len(words) + 1):
            goal_handle.publish_feedback(
                Ask.Feedback(partial_answer=" ".join(words[:count]), generated_tokens=count)
            )
        goal_handle.succeed()
        goal = goal_handle.request
        return Ask.Result(
            success=True, answer=" ".join(words), camera=goal.camera, header=goal.image.header,
            latency_s=0.5, prompt_tokens=160, generated_tokens=len(words),
        )

    action_server = ActionServer(server, Ask, "ask", execute, feedback_pub_qos_profile=feedback_qos)
    action_client = ActionClient(client, Ask, "ask", feedback_sub_qos_profile=feedback_qos)
    try:
        assert action_client.wait_for_server(timeout_sec=TIMEOUT_S), "Ask action server never appeared"
        feedback: list[Ask.Feedback] = []
        lock = threading.Lock()

        def on_feedback(message) -> None:  # noqa: ANN001 (Ask's FeedbackMessage)
            with lock:
                feedback.append(message.feedback)

        goal = Ask.Goal(question="what is it?", camera="left", image=make_image(Time(sec=3)))
        goal_handle = wait_future(
            executor, action_client.send_goal_async(goal, feedback_callback=on_feedback), "Ask goal response"
        )
        assert goal_handle.accepted
        # Collect all feedback before asking for the result: the client drops the goal's feedback
        # callback once its result arrives, and feedback may trail the result on the wire.
        spin_until(executor, lambda: len(feedback) == len(words), "all Ask feedback", TIMEOUT_S)
        result = wait_future(executor, goal_handle.get_result_async(), "Ask result").result

        assert result.success
        assert result.answer == "a red cup"
        assert result.camera == "left"
        assert result.header.stamp.sec == 3
        assert (result.prompt_tokens, result.generated_tokens) == (160, 3)
        assert [f.partial_answer for f in feedback] == ["a", "a red", "a red cup"]
        assert [f.generated_tokens for f in feedback] == [1, 2, 3]
    finally:
        action_client.destroy()
        action_server.destroy()


def test_answer_topic(nodes: tuple[Node, Node, MultiThreadedExecutor]) -> None:
    server, client, executor = nodes
    received: list[Answer] = []
    client.create_subscription(Answer, "answer", received.append, 10)
    publisher = server.create_publisher(Answer, "answer", 10)
    spin_until(executor, lambda: publisher.get_subscription_count() > 0, "Answer subscription match", TIMEOUT_S)

    message = Answer(camera="front", question="how many chairs?", answer="two", success=True, latency_s=0.75)
    message.header.stamp = Time(sec=42, nanosec=7)
    message.header.frame_id = "camera_optical"
    publisher.publish(message)
    spin_until(executor, lambda: len(received) == 1, "Answer message", TIMEOUT_S)

    got = received[0]
    assert (got.camera, got.question, got.answer, got.success, got.error) == (
        "front", "how many chairs?", "two", True, "",
    )
    assert (got.header.stamp.sec, got.header.stamp.nanosec, got.header.frame_id) == (42, 7, "camera_optical")
    assert got.latency_s == pytest.approx(0.75)
