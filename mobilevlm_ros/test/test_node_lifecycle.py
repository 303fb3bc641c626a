"""mobilevlm_node's lifecycle under load, through lifecycle_msgs/ChangeState asked from outside as a lifecycle manager
does: every open request gets its response with the transition's reason, the process stays up and serves again; a
configure that loads a model for long keeps get_state and /diagnostics answering.

The node runs as its own process (the console script) where the process must stay up, in this one otherwise.
"""

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import Transition
from rclpy.lifecycle import TransitionCallbackReturn

from mobilevlm_interfaces.action import Ask
from mobilevlm_interfaces.srv import VisualQuery
from mobilevlm_ros.runtime.vlm import MobileVLM
from ros_harness import (
    FRAME,
    TIMEOUT_S,
    Harness,
    ProcessClient,
    diagnostic_values,
    encode,
    node_parameters,
    stamp,
    start_node_process,
)

QUEUED = 8  # requests waiting behind the running one: the node's whole queue (max_queue)


@pytest.fixture(scope="module")
def long_checkpoint(make_checkpoint) -> Path:
    """Room for 8000 tokens: the running answer outlasts every wait of a test on a loaded machine."""
    return make_checkpoint(dtype=torch.float32, context_length=8192)


@pytest.fixture
def node_process(ros_context, long_checkpoint, tmp_path, request) -> Iterator[tuple[ProcessClient, object]]:
    """The console script in its own namespace and a client for it; SIGTERM at the end must still exit cleanly."""
    namespace = f"lifecycle_{request.node.name.removeprefix('test_')[:12]}"
    log = tmp_path / "node.log"
    process = start_node_process(long_checkpoint, namespace, log, max_new_tokens=4, max_queue=QUEUED,
                                 diagnostics_period_s=0.1)
    client = ProcessClient(ros_context, namespace)
    try:
        yield client, process
        assert process.poll() is None, f"the node exited:\n{log.read_text()}"
        process.terminate()
        assert process.wait(timeout=TIMEOUT_S) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        client.destroy()


def load_the_queue(client: ProcessClient) -> tuple[object, list]:
    """An Ask goal generating a long answer (running: its feedback has come) and QUEUED ~/vqa requests behind it
    (queued: the node's diagnostics say so). The goal's result future and the requests' response futures."""
    assert client.ask.wait_for_server(timeout_sec=TIMEOUT_S)
    first = client.answer_first(encode(FRAME, "rgb8", stamp(1)), "What is in the image?")
    assert first.success, first.error
    feedback: list[str] = []
    goal = client.ask.send_goal_async(Ask.Goal(question="Describe it all.", max_new_tokens=8000),
                                      feedback_callback=lambda m: feedback.append(m.feedback.partial_answer))
    client.spin_until(lambda: goal.done() and feedback, "the long answer running")
    queued = [client.vqa.call_async(VisualQuery.Request(question=f"Queued {i}?")) for i in range(QUEUED)]
    client.spin_until(lambda: any(diagnostic_values(s).get("queue depth") == str(QUEUED) for s in client.diagnostics),
                      f"{QUEUED} requests queued (diagnostics)")
    return goal.result().get_result_async(), queued


def transition(client: ProcessClient, transition_id: int, pending: list) -> None:
    """Ask for a transition and wait for its response and those of `pending`; it must succeed."""
    changed = client.lifecycle.request(transition_id)
    client.spin_until(lambda: changed.done() and all(future.done() for future in pending),
                      "the transition and every response")
    assert changed.result().success


def test_deactivate_with_requests_open_answers_them_all_and_activate_serves_again(node_process):
    client, process = node_process
    goal_result, queued = load_the_queue(client)
    transition(client, Transition.TRANSITION_DEACTIVATE, [goal_result, *queued])
    assert [future.result().error for future in queued] == ["node is deactivating"] * QUEUED
    assert goal_result.result().status == GoalStatus.STATUS_ABORTED
    assert goal_result.result().result.error == "node is deactivating"
    assert process.poll() is None and client.lifecycle.state() == "inactive"
    assert client.call(client.vqa, VisualQuery.Request(question="Still there?")).error == "node is not active"

    # cleanup, with requests arriving around it: each is answered, with the state it met
    around = [client.vqa.call_async(VisualQuery.Request(question=f"Around {i}?")) for i in range(QUEUED)]
    transition(client, Transition.TRANSITION_CLEANUP, around)
    met = {"node is not active", "node is cleaning up", "node is not configured"}
    assert {future.result().error for future in around} <= met
    assert process.poll() is None and client.lifecycle.state() == "unconfigured"

    transition(client, Transition.TRANSITION_CONFIGURE, [])
    transition(client, Transition.TRANSITION_ACTIVATE, [])
    answer = client.answer_first(encode(FRAME, "rgb8", stamp(2)), "And now?")
    assert answer.success and answer.header.stamp.sec == 2


def test_shutdown_with_requests_open_answers_them_all_and_the_process_stays_up(node_process):
    client, process = node_process
    goal_result, queued = load_the_queue(client)
    transition(client, Transition.TRANSITION_ACTIVE_SHUTDOWN, [goal_result, *queued])
    assert [future.result().error for future in queued] == ["node is shutting down"] * QUEUED
    assert goal_result.result().result.error == "node is shutting down"
    assert process.poll() is None and client.lifecycle.state() == "finalized"
    assert client.call(client.vqa, VisualQuery.Request(question="Still there?")).error == "node is shut down"


def test_a_request_that_meets_a_deactivate_after_taking_the_worker_fails_with_its_reason(ros_context, checkpoint):
    """A deactivate between the moment a request takes the worker and the moment it queues there: the request fails
    with "node is deactivating" (it queues on the worker it took, which refuses), nothing raises in the callback."""
    with Harness(ros_context, node_parameters(checkpoint), "race") as h:
        h.activate()
        h.publish_frame(encode(FRAME, "rgb8", stamp(3)))
        node, question = h.node, h.node._question
        deactivated: list[threading.Thread] = []

        def deactivate_meanwhile(*args):
            deactivated.append(threading.Thread(target=node.trigger_deactivate))
            deactivated[0].start()
            deadline = time.monotonic() + TIMEOUT_S
            while node.worker is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            return question(*args)

        node._question = deactivate_meanwhile
        response = h.call(h.vqa, VisualQuery.Request(question="Hi?"))
        deactivated[0].join(TIMEOUT_S)
        assert (response.success, response.error) == (False, "node is deactivating")
        assert h.lifecycle.state() == "inactive"
        del node._question
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).success


def test_get_state_and_diagnostics_answer_while_configure_loads_the_model(ros_context, checkpoint, monkeypatch):
    """The model loader is held in this process (a model that takes minutes to load on a robot): meanwhile the
    node's get_state says configuring, /diagnostics report it, a request is refused with the reason."""
    loading, release = threading.Event(), threading.Event()
    load = MobileVLM.from_pretrained

    def held_load(*args, **kwargs) -> MobileVLM:
        loading.set()
        release.wait(TIMEOUT_S)
        return load(*args, **kwargs)

    monkeypatch.setattr(MobileVLM, "from_pretrained", held_load)
    with Harness(ros_context, node_parameters(checkpoint), "slow_configure") as h:
        statuses: list[DiagnosticStatus] = []
        h.client.create_subscription(DiagnosticArray, "/diagnostics", lambda msg: statuses.extend(
            s for s in msg.status if s.name == f"{h.ns}/mobilevlm_node: inference"), 10)
        configured = h.lifecycle.request(Transition.TRANSITION_CONFIGURE)
        h.spin_until(loading.is_set, "the model load to start")
        assert h.lifecycle.state() == "configuring"
        seen = len(statuses)
        h.spin_until(lambda: len(statuses) > seen, "diagnostics while configuring")
        assert diagnostic_values(statuses[-1])["lifecycle state"] == "configuring"
        assert statuses[-1].message == "node is configuring"
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).error == "node is configuring"
        assert not configured.done()
        release.set()
        h.spin_until(configured.done, "configure to finish")
        assert configured.result().success and h.lifecycle.state() == "inactive"
