"""The node under overload, over a long run, and when its parts fail: model files, built artifacts, cameras, the
inference worker. Overload and soak run the console script as its own process, driven by client nodes in this one.
Figures (latency, queue depth, memory) are reported through the `figures` fixture; of them only memory has a limit.
"""

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import State
from rclpy.lifecycle import TransitionCallbackReturn
from safetensors.torch import load_file, save_file

from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.ros.diagnostics import error_kind
from ros_harness import (
    FRAME,
    PROCESS_TIMEOUT_S,
    Harness,
    ProcessClient,
    diagnostic_values,
    encode,
    node_parameters,
    start_node_process,
)

pytestmark = pytest.mark.reliability


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class NodeProcess:
    """`mobilevlm_node` in its own process with a frame from its camera, and a client node to watch its diagnostics."""

    def __init__(self, context, checkpoint: Path, namespace: str, log: Path, **parameters):
        self.namespace, self.log = namespace, log
        self.process = start_node_process(checkpoint, namespace, log, **parameters)
        self.client = ProcessClient(context, namespace)
        try:
            assert self.client.vqa.wait_for_service(timeout_sec=PROCESS_TIMEOUT_S), log.read_text()
            first = self.client.answer_first(encode(FRAME, "rgb8", Time(sec=1)), "What is in the image?")
            assert first.success, first.error
        except BaseException:
            self.process.kill()
            self.client.destroy()
            raise

    def latest_diagnostics(self) -> dict[str, str]:
        """The values of a status published from now on (the node publishes at 1 Hz). Older ones may still wait in
        the subscription's queue while this client's executor was not spun: take them first."""
        for _ in range(100):  # each call runs at most one ready callback
            self.client.executor.spin_once(timeout_sec=0)
        seen = len(self.client.diagnostics)
        self.client.spin_until(lambda: len(self.client.diagnostics) > seen, "diagnostics", timeout_s=10)
        return diagnostic_values(self.client.diagnostics[-1])

    def close(self) -> None:
        self.process.terminate()
        try:
            assert self.process.wait(timeout=10) == 0, self.log.read_text()
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.client.destroy()


def outcome(response) -> str:
    """answered, busy, timeout, or "error: " and the kind of error."""
    if response.success:
        return "answered"
    kind = error_kind(response.error)
    return kind if kind in ("busy", "timeout") else f"error: {kind}"


class LoadClient:
    """One client with its own node and thread, keeping `window` requests open until `total` have had a response."""

    def __init__(self, context, namespace: str, index: int, total: int, window: int, make_request: Callable[[int], tuple]):
        self.client = ProcessClient(context, namespace, name=f"load_client_{index}")
        self.total, self.window, self.make_request = total, window, make_request
        self.latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.sent = self.lost = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def connect(self) -> None:
        """Get one response from each service before the load. `wait_for_service` only proves that this client has
        discovered the node; until the node has also discovered this client's response reader, a response sent to
        it is lost (a DDS discovery race, slow on a busy machine): ask again until one arrives."""
        for client, request in ((self.client.vqa, VisualQuery.Request(question="Ready?")),
                                (self.client.navigate, NavigationInstruction.Request(instruction="Ready?"))):
            assert client.wait_for_service(timeout_sec=30)
            for _ in range(10):
                future = client.call_async(request)
                deadline = time.monotonic() + 5.0
                while not future.done() and time.monotonic() < deadline:
                    self.client.executor.spin_once(timeout_sec=0.1)
                if future.done():
                    break
            assert future.done(), f"{client.srv_name}: no response to 10 tries"

    def run(self, patience_s: float = 60.0) -> None:
        """Send and collect until every request is answered, or open for longer than `patience_s` (then lost)."""
        open_requests: list[tuple[float, object]] = []
        while self.sent < self.total or open_requests:
            while self.sent < self.total and len(open_requests) < self.window:
                service, request = self.make_request(self.sent)
                open_requests.append((time.monotonic(), getattr(self.client, service).call_async(request)))
                self.sent += 1
            self.client.executor.spin_once(timeout_sec=0.5)  # returns once a response has been handled
            for item in [item for item in open_requests if item[1].done()]:
                open_requests.remove(item)
                self.latencies.append(time.monotonic() - item[0])
                self.outcomes[outcome(item[1].result())] += 1
            for item in [item for item in open_requests if time.monotonic() - item[0] > patience_s]:
                open_requests.remove(item)
                self.lost += 1


def resolved(diagnostics: dict[str, str]) -> int:
    """Requests the node has given a result, by its diagnostics."""
    return int(diagnostics["answered"]) + int(diagnostics["errors"])


def mixed_request(index: int) -> tuple[str, object]:
    """Every eighth request a navigation (which jumps the queue), the others questions."""
    if index % 8 == 0:
        return "navigate", NavigationInstruction.Request(instruction="Go to the door.")
    return "vqa", VisualQuery.Request(question=f"What is at position {index}?")


@pytest.mark.slow
def test_overload_every_request_gets_a_response(ros_context, checkpoint, tmp_path, figures):
    """8 clients x 200 requests, each client keeping 4 open: 32 for 8 places in the queue, so many are refused as busy."""
    node = NodeProcess(ros_context, checkpoint, "overload", tmp_path / "node.log", max_queue=8, max_new_tokens=1, request_timeout_s=5.0)
    clients = [LoadClient(ros_context, "overload", i, total=200, window=4, make_request=mixed_request) for i in range(8)]
    try:
        for client in clients:
            client.connect()
        before = node.latest_diagnostics()
        started = time.monotonic()
        for client in clients:
            client.thread.start()
        for client in clients:
            client.thread.join()
        elapsed = time.monotonic() - started
        diagnostics = node.latest_diagnostics()
    finally:
        for client in clients:
            client.client.destroy()
        node.close()
    outcomes = sum((client.outcomes for client in clients), Counter())
    latencies = np.array([latency for client in clients for latency in client.latencies])
    figures["overload: 8 clients x 200 requests"] = {
        "outcomes": dict(outcomes), "lost": sum(client.lost for client in clients), "seconds": round(elapsed, 1),
        "latency p50 s": round(float(np.percentile(latencies, 50)), 4), "latency p99 s": round(float(np.percentile(latencies, 99)), 4),
        "max queue depth": int(diagnostics["max queue depth"]),
        "resolved by the node": resolved(diagnostics) - resolved(before),
    }
    assert sum(client.sent for client in clients) == 1600
    assert resolved(diagnostics) - resolved(before) == 1600, diagnostics
    assert sum(client.lost for client in clients) == 0
    assert sum(outcomes.values()) == 1600
    assert set(outcomes) <= {"answered", "busy", "timeout"}, outcomes
    assert outcomes["answered"] > 0 and outcomes["busy"] > 0  # 32 open requests, 8 places: both must happen
    assert int(diagnostics["max queue depth"]) == 8


def soak_request(index: int) -> tuple[str, object]:
    """Mostly questions about the camera's frame; every 50th a frame of its own (a new session), every 50th a
    navigation, every 10th a request refused for its camera."""
    if index % 50 == 0:
        image = encode(np.roll(FRAME, index, axis=1), "bgr8", Time(sec=index))
        return "vqa", VisualQuery.Request(question="What changed?", image=image)
    if index % 50 == 25:
        return "navigate", NavigationInstruction.Request(instruction="Go to the door.")
    if index % 10 == 7:
        return "vqa", VisualQuery.Request(question="What is there?", camera=f"camera_{index}")
    return "vqa", VisualQuery.Request(question=f"What is at position {index}?")


@pytest.mark.slow
def test_soak_memory_stays_flat(ros_context, checkpoint, tmp_path, figures):
    node = NodeProcess(ros_context, checkpoint, "soak", tmp_path / "node.log", max_new_tokens=1)
    warmup = LoadClient(ros_context, "soak", 0, total=100, window=2, make_request=soak_request)
    soak = LoadClient(ros_context, "soak", 1, total=1900, window=2, make_request=lambda i: soak_request(i + 100))
    try:
        warmup.connect()
        soak.connect()
        warmup.run()
        rss_100 = rss_bytes(node.process.pid)
        soak.run()
        rss_2000 = rss_bytes(node.process.pid)
    finally:
        warmup.client.destroy()
        soak.client.destroy()
        node.close()
    figures["soak: RSS MB after 100 and 2000 requests"] = [round(rss_100 / 2**20, 1), round(rss_2000 / 2**20, 1)]
    for client, total in ((warmup, 100), (soak, 1900)):
        assert client.outcomes == {"answered": total - total // 10, "error: unknown camera": total // 10}, client.outcomes
    assert rss_2000 <= 1.10 * rss_100, f"RSS grew from {rss_100 / 2**20:.0f} MB to {rss_2000 / 2**20:.0f} MB"


# ---- faults -------------------------------------------------------------------------------------------------------


def diagnostics_message(h: Harness, predicate: Callable[[DiagnosticStatus], bool], what: str) -> DiagnosticStatus:
    """The first status of this harness's node on /diagnostics that satisfies `predicate`."""
    statuses: list[DiagnosticStatus] = []
    name = f"{h.ns}/mobilevlm_node: inference"
    subscription = h.client.create_subscription(
        DiagnosticArray, "/diagnostics", lambda msg: statuses.extend(s for s in msg.status if s.name == name and predicate(s)), 10)
    try:
        h.spin_until(lambda: statuses, what, timeout_s=10)
    finally:
        h.client.destroy_subscription(subscription)
    return statuses[0]


def corrupt_config(path: Path) -> str:
    (path / "config.json").write_text("{not json")
    return "config.json"


def corrupt_weights(path: Path) -> str:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    return "model.safetensors: unreadable or corrupt weight file"


def corrupt_tokenizer(path: Path) -> str:
    (path / "tokenizer.model").write_bytes(b"\x00garbage" * 100)
    return "tokenizer.model"


def wrong_shapes(path: Path) -> str:
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(3, dtype=weights["model.norm.weight"].dtype)
    save_file(weights, path / "model.safetensors")
    return "wrong shape: model.norm.weight"


def config_not_an_object(path: Path) -> str:
    (path / "config.json").write_text(json.dumps(["a", "list"]))
    return "config.json"


def config_of_an_impossible_model(path: Path) -> str:
    """Valid fields describing a model no machine can hold: torch's allocator fails, not our loader's checks."""
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"hidden_size": 2**40}))
    return "RuntimeError"


@pytest.mark.parametrize("corrupt", [corrupt_config, config_not_an_object, config_of_an_impossible_model, corrupt_weights,
                                     wrong_shapes, corrupt_tokenizer])
def test_a_corrupt_model_leaves_the_node_up_and_unconfigured_until_it_is_fixed(ros_context, copy_checkpoint, tmp_path, corrupt):
    """The error names the file in /diagnostics; once the files are good again, configure works without a restart."""
    path = copy_checkpoint(dtype=torch.float32)
    good = {name: (path / name).read_bytes() for name in ("config.json", "model.safetensors", "tokenizer.model")}
    expected = corrupt(path)
    with Harness(ros_context, node_parameters(path), f"corrupt_{corrupt.__name__}") as h:
        assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert h.node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
        assert h.thread.is_alive()
        status = diagnostics_message(h, lambda s: s.level == DiagnosticStatus.ERROR, "the configure error in diagnostics")
        assert status.message.startswith("not configured: ") and expected in status.message, status.message
        for name, data in good.items():
            (path / name).write_bytes(data)
        h.activate()
        h.publish_frame(encode(FRAME, "rgb8", Time(sec=1)))
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).success


def only_file(directory: Path, pattern: str) -> Path:
    [path] = directory.glob(pattern)
    return path


@pytest.mark.parametrize("backend, pattern", [({"vision_backend": "onnxruntime"}, "vision-onnx-*.onnx"),
                                              ({"language_backend": "llamacpp", "quant": "f32"}, "llm-gguf-*.gguf")],
                         ids=["onnx", "gguf"])
def test_an_artifact_corrupted_between_runs_is_rebuilt(ros_context, checkpoint, tmp_path, backend, pattern):
    """The engines dir outlives the node; a damaged file in it is found by its sha256 at the next configure."""
    engines = tmp_path / "engines"
    answers = []
    for run in range(2):
        with Harness(ros_context, node_parameters(checkpoint, engines_dir=str(engines), **backend), f"artifact_{run}_{pattern[:3]}") as h:
            h.activate()
            h.publish_frame(encode(FRAME, "rgb8", Time(sec=1)))
            response = h.call(h.vqa, VisualQuery.Request(question="What colour?"))
            assert response.success, response.error
            answers.append(response.answer)
        artifact = only_file(engines, pattern)
        if run == 0:
            data = bytearray(artifact.read_bytes())
            data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, other bytes: only the sha256 tells
            corrupted = bytes(data)
            artifact.write_bytes(corrupted)
    manifest = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    rebuilt = artifact.read_bytes()
    assert rebuilt != corrupted, "the corrupted artifact was used instead of rebuilt"
    assert hashlib.sha256(rebuilt).hexdigest() == manifest["sha256"]
    assert answers[0] == answers[1]


def test_a_silent_camera_is_reported_by_requests_and_diagnostics(ros_context, checkpoint):
    with Harness(ros_context, node_parameters(checkpoint, max_frame_age_s=2.0), "silent") as h:
        h.activate()
        h.publish_frame(encode(FRAME, "rgb8", h.node.get_clock().now().to_msg()))
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).success
        # The camera stops publishing: once its last frame is older than max_frame_age_s, both say so.
        status = diagnostics_message(h, lambda s: "no frame from camera 'camera' for" in s.message, "the silent camera warning")
        assert status.level == DiagnosticStatus.WARN
        assert "max_frame_age_s is 2" in status.message and "no frame from camera 'front' yet" in status.message
        response = h.call(h.vqa, VisualQuery.Request(question="Hi?"))
        assert not response.success and response.error.startswith("no frame from camera 'camera' for ")
        h.publish_frame(encode(FRAME, "rgb8", h.node.get_clock().now().to_msg()))
        assert h.call(h.vqa, VisualQuery.Request(question="Hi?")).success


def test_an_exception_in_inference_fails_that_request_and_the_next_is_answered(ros_context, checkpoint, monkeypatch):
    with Harness(ros_context, node_parameters(checkpoint), "injected") as h:
        h.activate()
        h.publish_frame(encode(FRAME, "rgb8", Time(sec=1)))
        session = h.node.vlm.session
        faults = iter([RuntimeError("injected fault")])

        def failing_session(*args, **kwargs):
            fault = next(faults, None)
            if fault is not None:
                raise fault
            return session(*args, **kwargs)

        monkeypatch.setattr(h.node.vlm, "session", failing_session)
        failed = h.call(h.vqa, VisualQuery.Request(question="Hi?"))
        assert (failed.success, failed.error) == (False, "internal error: RuntimeError: injected fault")
        assert h.node.worker.alive and h.thread.is_alive()
        answered = h.call(h.vqa, VisualQuery.Request(question="Hi?"))
        assert answered.success, answered.error
