"""The inference worker: priority order, bounded queue, timeouts, cancel, fault isolation, session reuse, navigation's
overview, stop. Every outcome arrives through the future `submit` returns."""

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import pytest
from sensor_msgs.msg import Image

from mobilevlm_ros.ros.frames import Frame
from mobilevlm_ros.ros.worker import InferenceWorker, Navigation, Question, Result, View
from mobilevlm_ros.runtime.navigation import navigation_question
from mobilevlm_ros.runtime.sampling import SamplingParams

WAIT_S = 60.0  # bound on every wait for a result; none of them is a measurement
TIMEOUT_S = 30.0  # a request's own timeout where the test is not about timeouts
SHORT = SamplingParams(max_new_tokens=2)
LONG_TOKENS = 60  # long enough that the queue fills behind it: its first token is the signal to go on
ACTIONS = ["left", "right"]


def frame(seed: int = 0) -> Frame:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    return Frame("camera", Image(height=32, width=48, encoding="rgb8", step=48 * 3, data=pixels.tobytes()), 0)


def question(shot: Frame, text: str = "What colour?", params: SamplingParams = SHORT, **fields) -> Question:
    return Question(frame=shot, text=text, params=params, timeout_s=fields.pop("timeout_s", TIMEOUT_S), **fields)


def long_question(shot: Frame, started: threading.Event) -> Question:
    """A question that keeps the worker busy; `started` is set by its first token."""
    return question(shot, "Describe everything.", SamplingParams(max_new_tokens=LONG_TOKENS, min_new_tokens=LONG_TOKENS),
                    on_text=lambda text, tokens: started.set())


def navigation(shot: Frame, instruction: str = "Go.") -> Navigation:
    return Navigation(frame=shot, question=navigation_question(instruction, ACTIONS), actions=ACTIONS, timeout_s=TIMEOUT_S)


@pytest.fixture
def make_worker(vlm) -> Iterator[Callable[[int], InferenceWorker]]:
    """Started workers with a queue of the given size, stopped after the test."""
    workers: list[InferenceWorker] = []

    def make(max_queue: int = 8) -> InferenceWorker:
        workers.append(InferenceWorker(vlm, max_queue))
        workers[-1].start()
        return workers[-1]

    yield make
    for worker in workers:
        worker.stop("test over")


def completion_order(futures: dict[str, Future]) -> list[str]:
    """The names of `futures` in the order they complete (their callbacks run on the worker thread, one at a time)."""
    order: list[str] = []
    for name, future in futures.items():
        future.add_done_callback(lambda _, name=name: order.append(name))
    for future in futures.values():
        future.result(WAIT_S)
    return order


def test_navigation_goes_before_questions_queued_earlier(make_worker):
    worker, started, shot = make_worker(), threading.Event(), frame()
    first = worker.submit(long_question(shot, started))
    assert started.wait(WAIT_S)
    futures = {"first": first, "question": worker.submit(question(shot)), "navigation": worker.submit(navigation(shot))}
    assert completion_order(futures) == ["first", "navigation", "question"]
    assert all(future.result().success for future in futures.values())
    assert futures["navigation"].result().action in ACTIONS


def test_a_full_queue_refuses_at_once(make_worker):
    worker, started = make_worker(max_queue=1), threading.Event()
    running = worker.submit(long_question(frame(), started))
    assert started.wait(WAIT_S)
    queued = worker.submit(question(frame(), "Queued?"))
    refused = worker.submit(question(frame(), "One more?"))
    assert refused.done(), "a full queue answers in the submitting thread"
    assert (refused.result().error, refused.result().frame) == ("busy: queue full (1)", None)
    assert running.result(WAIT_S).success and queued.result(WAIT_S).success


def test_timeouts_in_the_queue_and_while_generating(make_worker):
    worker, started = make_worker(), threading.Event()
    running = worker.submit(long_question(frame(), started))
    assert started.wait(WAIT_S)
    late = worker.submit(question(frame(), "Late?", timeout_s=0.001))
    running.result(WAIT_S)
    slow = worker.submit(question(frame(), "Describe.", SamplingParams(max_new_tokens=2000, min_new_tokens=2000), timeout_s=0.3))
    assert late.result(WAIT_S).error == "timeout: waited more than 0.001 s in the queue"
    assert slow.result(WAIT_S).error == "timeout: no answer within 0.3 s"
    assert 0 < slow.result().generated_tokens < 2000


def test_cancel_stops_generation(make_worker):
    cancel = threading.Event()
    canceled = make_worker().submit(question(frame(), "Describe.", SamplingParams(max_new_tokens=2000, min_new_tokens=2000),
                                             on_text=lambda text, tokens: tokens >= 5 and cancel.set(), cancelled=cancel.is_set))
    result = canceled.result(WAIT_S)
    assert (result.success, result.error) == (False, "canceled")
    assert result.generated_tokens < 50


def test_an_exception_costs_one_request_and_the_worker_recovers(make_worker, caplog):
    class BrokenFrame(Frame):
        def to_rgb(self):
            raise RuntimeError("boom")

    worker = make_worker()
    broken = worker.submit(question(BrokenFrame("camera", Image(), 0), "Hi?"))
    following = worker.submit(question(frame(), "Hi?"))
    assert broken.result(WAIT_S).error == "internal error: RuntimeError: boom"
    assert following.result(WAIT_S).success
    assert "inference failed" in caplog.text


@pytest.mark.reliability
def test_a_failing_done_callback_costs_only_its_response(make_worker):
    """A response that cannot be delivered (its callback raises) leaves the worker serving."""
    worker = make_worker()

    def undeliverable(future: Future) -> None:
        raise RuntimeError("the client went away")

    worker.submit(question(frame(), "Hi?")).add_done_callback(undeliverable)
    assert worker.submit(question(frame(), "Hi?")).result(WAIT_S).success
    assert worker.alive


def test_questions_about_one_frame_share_its_session(vlm, make_worker, monkeypatch):
    encoded = []
    original = vlm.session
    monkeypatch.setattr(vlm, "session", lambda image, *a, **k: encoded.append(1) or original(image, *a, **k))
    worker = make_worker()
    shot, other = frame(1), frame(2)
    asked = (("a", shot), ("b", shot), ("c", other), ("d", other))
    futures = {name: worker.submit(question(which, f"Question {name}?")) for name, which in asked}
    results = {name: future.result(WAIT_S) for name, future in futures.items()}
    assert all(result.success for result in results.values())
    assert len(encoded) == 2
    assert results["b"].answer == original(frame(1).to_rgb()).ask("Question b?", SHORT).text
    assert results["c"].frame is other


def test_navigation_sees_the_overview_after_a_question_in_another_mode(vlm, make_worker, monkeypatch):
    """A Navigation has no view: after a per_tile question about the same frame it opens the frame's overview."""
    modes = []
    original = vlm.session
    monkeypatch.setattr(vlm, "session", lambda image, *a, mode="overview", **k: modes.append(mode) or original(image, *a, mode=mode, **k))
    worker, shot = make_worker(), frame(3)
    assert worker.submit(question(shot, view=View("per_tile", max_tiles=2))).result(WAIT_S).success
    chose = worker.submit(navigation(shot, "Go to the red door."))
    assert chose.result(WAIT_S).success
    assert modes == ["per_tile", "overview"]
    expected = original(shot.to_rgb()).choose(navigation_question("Go to the red door.", ACTIONS), ACTIONS)
    assert chose.result().action == expected.option
    assert chose.result().scores == pytest.approx(expected.scores)


def test_stop_fails_what_is_queued_and_refuses_what_comes_after(make_worker):
    worker, started = make_worker(), threading.Event()
    running = worker.submit(question(frame(), "Describe.", SamplingParams(max_new_tokens=5000, min_new_tokens=5000),
                                     on_text=lambda text, tokens: started.set()))
    assert started.wait(WAIT_S)
    queued = worker.submit(question(frame(), "Queued?"))
    worker.stop("node is deactivating")
    assert running.result(WAIT_S).error == queued.result(WAIT_S).error == "node is deactivating"
    after: Result = worker.submit(question(frame(), "After?")).result(0)
    assert (after.error, after.frame) == ("node is deactivating", None)
