"""One thread owns all inference; requests wait in a bounded priority queue (navigation before questions).

Nothing here touches rclpy: the node turns messages into `Request`s and the `done` callback back into responses,
so the worker is the same code under a service, an action, a topic or a test.
"""

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from mobilevlm_ros.errors import MobileVLMError
from mobilevlm_ros.model.tiling import DEFAULT_MAX_TILES
from mobilevlm_ros.ros.frames import Frame
from mobilevlm_ros.runtime.navigation import navigation_question
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import PerTileSession, Session
from mobilevlm_ros.runtime.vlm import MobileVLM, Roi

logger = logging.getLogger(__name__)


class Priority(IntEnum):
    NAVIGATION = 0  # a robot waiting for its next move comes first
    QUESTION = 1


@dataclass
class Result:
    success: bool
    error: str = ""
    answer: str = ""
    action: str = ""
    confidence: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    latency_s: float = 0.0


@dataclass
class Request:
    """A question (`actions` empty) or a navigation choice about `frame`."""

    camera: str
    text: str
    frame: Frame
    actions: list[str] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "overview"  # how the model sees the frame (choices.IMAGE_MODES); navigation uses the overview
    roi: Roi | None = None  # x, y, width, height: mode crop's region
    max_tiles: int = DEFAULT_MAX_TILES
    on_text: Callable[[str, int], None] | None = None  # streaming: (text so far, tokens so far)
    cancelled: Callable[[], bool] = lambda: False
    timeout_s: float = 30.0
    done: Callable[[Result], None] = lambda result: None  # called exactly once, from the worker thread
    received: float = field(default_factory=time.monotonic)

    @property
    def priority(self) -> Priority:
        return Priority.NAVIGATION if self.actions else Priority.QUESTION


class Busy(MobileVLMError):
    """The queue is full; the request was not accepted."""


class InferenceWorker:
    def __init__(self, vlm: MobileVLM, max_queue: int, navigation_prompt: str):
        self.vlm = vlm
        self.max_queue = max_queue
        self.navigation_prompt = navigation_prompt
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._session: tuple[Frame, tuple, Session | PerTileSession] | None = None  # the last frame's, for its next question
        self._stopping = False
        self._lock = threading.Lock()  # a submit is refused, or queued before stop() drains the queue: never lost
        self._thread = threading.Thread(target=self._run, name="mobilevlm-inference", daemon=True)
        self.busy = False
        self.max_depth = 0  # the deepest the queue has been: how close overload came to `max_queue`

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue `request`, or raise Busy at once when the queue is full (the caller answers with that error)."""
        with self._lock:  # executor threads submit concurrently: check and put as one step
            if self._stopping:
                raise Busy("node is shutting down")
            if self._queue.qsize() >= self.max_queue:
                raise Busy(f"busy: queue full ({self.max_queue})")
            self._queue.put((request.priority, next(self._order), request))
            self.max_depth = max(self.max_depth, self._queue.qsize())

    def stop(self, timeout_s: float = 5.0) -> None:
        """Interrupt the request in flight, fail the queued ones, and end the thread."""
        with self._lock:
            self._stopping = True
        self._queue.put((-1, -1, None))
        self._thread.join(timeout_s)
        while True:
            try:
                _, _, request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                _deliver(request, Result(False, error="node is shutting down", latency_s=time.monotonic() - request.received))

    def _run(self) -> None:
        while True:
            _, _, request = self._queue.get()
            if request is None or self._stopping:
                if request is not None:
                    _deliver(request, Result(False, error="node is shutting down"))
                return
            self.busy = True
            try:
                result = self._answer(request)
            except MobileVLMError as error:
                result = Result(False, error=str(error))
            except Exception as error:  # a bug must cost one request, never the worker
                logger.exception("inference failed")
                result = Result(False, error=f"internal error: {type(error).__name__}: {error}")
            finally:
                self.busy = False
            result.latency_s = time.monotonic() - request.received
            _deliver(request, result)

    def _answer(self, request: Request) -> Result:
        deadline = request.received + request.timeout_s
        if time.monotonic() > deadline:
            return Result(False, error=f"timeout: waited more than {request.timeout_s:g} s in the queue")
        if request.cancelled():
            return Result(False, error="canceled")
        session = self._session_for(request)
        if request.actions:
            choice = session.choose(navigation_question(request.text, request.actions, self.navigation_prompt), request.actions)
            return Result(True, action=choice.option, confidence=choice.confidence, scores=choice.scores, prompt_tokens=session.prompt_tokens)
        return self._generate(session, request, deadline)

    def _generate(self, session: Session | PerTileSession, request: Request, deadline: float) -> Result:
        def should_stop() -> bool:
            return self._stopping or request.cancelled() or time.monotonic() > deadline

        answer = session.ask(request.text, request.params, request.on_text, should_stop)
        result = Result(True, answer=answer.text, prompt_tokens=answer.prompt_tokens, generated_tokens=answer.generated_tokens)
        if answer.interrupted:
            result.success = False
            if self._stopping:
                result.error = "node is shutting down"
            elif request.cancelled():
                result.error = "canceled"
            else:
                result.error = f"timeout: no answer within {request.timeout_s:g} s"
        return result

    def _session_for(self, request: Request) -> Session | PerTileSession:
        """The session of the request's frame and view: reused when the previous request asked about the same ones."""
        frame, view = request.frame, (request.mode, request.roi, request.max_tiles)
        if self._session is None or self._session[0] is not frame or self._session[1] != view:
            self._session = (frame, view, self.vlm.session(frame.to_rgb(), mode=request.mode, roi=request.roi, max_tiles=request.max_tiles))
        return self._session[2]


def _deliver(request: Request, result: Result) -> None:
    """Hand `result` to the request's `done`; a failing callback costs that response, never the worker thread."""
    try:
        request.done(result)
    except Exception:
        logger.exception("delivering a result failed")
