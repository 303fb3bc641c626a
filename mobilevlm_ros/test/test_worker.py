"""The inference worker: priority order, bounded queue, timeouts, cancel, fault isolation, session reuse, stop."""

import threading

import numpy as np
import pytest
import torch
from sensor_msgs.msg import Image

from mobilevlm_ros.ros.frames import Frame
from mobilevlm_ros.ros.worker import Busy, InferenceWorker, Request, Result
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.vlm import MobileVLM

PROMPT = "{instruction}\nAnswer with one of: {actions}."


@pytest.fixture(scope="module")
def vlm(make_checkpoint) -> MobileVLM:
    return MobileVLM.from_pretrained(make_checkpoint(dtype=torch.float32), device="cpu")


def frame(seed: int = 0) -> Frame:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    return Frame("camera", Image(height=32, width=48, encoding="rgb8", step=144, data=pixels.tobytes()), 0)


class Collector:
    """`done` callbacks that remember results in completion order."""

    def __init__(self):
        self.results: list[tuple[str, Result]] = []
        self.changed = threading.Condition()

    def done(self, name: str):
        def record(result: Result) -> None:
            with self.changed:
                self.results.append((name, result))
                self.changed.notify_all()

        return record

    def wait(self, count: int) -> dict[str, Result]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.results) >= count, 60), f"only {len(self.results)} of {count} results"
            return dict(self.results)


def long_request(collector: Collector, name: str, shot: Frame, started: threading.Event | None = None) -> Request:
    """A request that keeps the worker busy until `started` has been seen (its first token sets it)."""
    return Request("camera", "Describe everything.", shot, params=SamplingParams(max_new_tokens=60, min_new_tokens=60),
                   on_text=(lambda text, n: started.set()) if started else None, done=collector.done(name))


def test_navigation_goes_before_questions_queued_earlier(vlm):
    worker, collector, started = InferenceWorker(vlm, 8, PROMPT), Collector(), threading.Event()
    worker.start()
    try:
        shot = frame()
        worker.submit(long_request(collector, "first", shot, started))
        assert started.wait(30)
        worker.submit(Request("camera", "What colour?", shot, params=SamplingParams(max_new_tokens=2), done=collector.done("question")))
        worker.submit(Request("camera", "Go.", shot, actions=["left", "right"], done=collector.done("navigation")))
        results = collector.wait(3)
        assert [name for name, _ in collector.results] == ["first", "navigation", "question"]
        assert all(result.success for result in results.values())
        assert results["navigation"].action in ("left", "right")
    finally:
        worker.stop()


def test_a_full_queue_refuses_at_once(vlm):
    worker, collector, started = InferenceWorker(vlm, 1, PROMPT), Collector(), threading.Event()
    worker.start()
    try:
        worker.submit(long_request(collector, "running", frame(), started))
        assert started.wait(30)
        worker.submit(Request("camera", "Queued?", frame(), done=collector.done("queued")))
        with pytest.raises(Busy, match=r"busy: queue full \(1\)"):
            worker.submit(Request("camera", "One more?", frame()))
        collector.wait(2)
    finally:
        worker.stop()


def test_timeouts_in_the_queue_and_while_generating(vlm):
    worker, collector, started = InferenceWorker(vlm, 8, PROMPT), Collector(), threading.Event()
    worker.start()
    try:
        worker.submit(long_request(collector, "running", frame(), started))
        assert started.wait(30)
        worker.submit(Request("camera", "Late?", frame(), timeout_s=0.001, done=collector.done("queued")))
        collector.wait(2)
        slow = Request("camera", "Describe.", frame(), params=SamplingParams(max_new_tokens=2000, min_new_tokens=2000),
                       timeout_s=0.3, done=collector.done("slow"))
        worker.submit(slow)
        results = collector.wait(3)
        assert results["queued"].error == "timeout: waited more than 0.001 s in the queue"
        assert results["slow"].error == "timeout: no answer within 0.3 s"
        assert 0 < results["slow"].generated_tokens < 2000
    finally:
        worker.stop()


def test_cancel_stops_generation(vlm):
    worker, collector = InferenceWorker(vlm, 8, PROMPT), Collector()
    cancel = threading.Event()
    worker.start()
    try:
        worker.submit(Request("camera", "Describe.", frame(), params=SamplingParams(max_new_tokens=2000, min_new_tokens=2000),
                              on_text=lambda text, n: n >= 5 and cancel.set(), cancelled=cancel.is_set,
                              done=collector.done("canceled")))
        result = collector.wait(1)["canceled"]
        assert (result.success, result.error) == (False, "canceled")
        assert result.generated_tokens < 50
    finally:
        worker.stop()


def test_an_exception_costs_one_request_and_the_worker_recovers(vlm, caplog):
    class BrokenFrame(Frame):
        def to_rgb(self):
            raise RuntimeError("boom")

    worker, collector = InferenceWorker(vlm, 8, PROMPT), Collector()
    worker.start()
    try:
        worker.submit(Request("camera", "Hi?", BrokenFrame("camera", Image(), 0), done=collector.done("broken")))
        worker.submit(Request("camera", "Hi?", frame(), params=SamplingParams(max_new_tokens=2), done=collector.done("next")))
        results = collector.wait(2)
        assert results["broken"].error == "internal error: RuntimeError: boom"
        assert results["next"].success
        assert "inference failed" in caplog.text
    finally:
        worker.stop()


def test_questions_about_one_frame_share_its_session(vlm, monkeypatch):
    encoded = []
    original = vlm.session
    monkeypatch.setattr(vlm, "session", lambda image, *a, **k: encoded.append(1) or original(image, *a, **k))
    worker, collector = InferenceWorker(vlm, 8, PROMPT), Collector()
    worker.start()
    try:
        shot, other = frame(1), frame(2)
        for name, which in (("a", shot), ("b", shot), ("c", other), ("d", other)):
            worker.submit(Request("camera", f"Question {name}?", which, params=SamplingParams(max_new_tokens=2), done=collector.done(name)))
        results = collector.wait(4)
        assert all(r.success for r in results.values())
        assert len(encoded) == 2
        fresh = vlm.session(frame(1).to_rgb()).ask("Question b?", SamplingParams(max_new_tokens=2)).text
        assert results["b"].answer == fresh
    finally:
        worker.stop()


def test_stop_fails_what_is_queued(vlm):
    worker, collector, started = InferenceWorker(vlm, 8, PROMPT), Collector(), threading.Event()
    worker.start()
    worker.submit(Request("camera", "Describe.", frame(), params=SamplingParams(max_new_tokens=5000, min_new_tokens=5000),
                          on_text=lambda text, n: started.set(), done=collector.done("running")))
    assert started.wait(30)
    worker.submit(Request("camera", "Queued?", frame(), done=collector.done("queued")))
    worker.stop()
    results = collector.wait(2)
    assert results["running"].error == results["queued"].error == "node is shutting down"
    with pytest.raises(Busy, match="shutting down"):
        worker.submit(Request("camera", "After?", frame()))
