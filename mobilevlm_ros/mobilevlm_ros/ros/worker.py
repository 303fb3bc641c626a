"""One thread owns all inference; requests wait in a bounded priority queue (navigation before questions).

Nothing here touches rclpy: the node turns messages into a `Question` or a `Navigation`, and `submit` gives back a
`concurrent.futures.Future` of its result, so the worker is the same code under a service, an action, a topic or a
test. Every failure is a result with an `error`, never an exception: full queue, timeout, cancel, a bad frame, a bug.
"""

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import ClassVar

from mobilevlm_ros.errors import MobileVLMError
from mobilevlm_ros.model.tiling import DEFAULT_MAX_TILES
from mobilevlm_ros.ros.frames import Frame
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import PerTileSession, Session
from mobilevlm_ros.runtime.vlm import MobileVLM, Roi

logger = logging.getLogger(__name__)


class Priority(IntEnum):
    NAVIGATION = 0  # a robot waiting for its next move comes first
    QUESTION = 1


@dataclass(frozen=True)
class View:
    """How the model sees a frame (choices.IMAGE_MODES): the mode, crop's region, the tile budget."""

    mode: str = "overview"
    roi: Roi | None = None  # x, y, width, height: mode crop's region
    max_tiles: int = DEFAULT_MAX_TILES


OVERVIEW = View()


@dataclass
class Result:
    """What every result says: whether it failed and why, about which frame, after how long."""

    error: str = ""  # empty: success
    frame: Frame | None = None  # the frame asked about; None when the request was refused before it was queued
    latency_s: float = 0.0

    @property
    def success(self) -> bool:
        return not self.error


@dataclass
class QuestionResult(Result):
    answer: str = ""  # on failure, what was generated before it
    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class NavigationResult(Result):
    action: str = ""
    confidence: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)  # every action's
    prompt_tokens: int = 0


@dataclass(frozen=True, kw_only=True)
class Question:
    """A question about `frame`, answered by generating text."""

    frame: Frame
    text: str
    params: SamplingParams
    view: View = OVERVIEW
    timeout_s: float
    on_text: Callable[[str, int], None] | None = None  # streaming: (text so far, tokens so far)
    cancelled: Callable[[], bool] | None = None  # whether the client has given up (asked between tokens)
    received: float = field(default_factory=time.monotonic)
    priority: ClassVar[Priority] = Priority.QUESTION
    result_type: ClassVar[type[QuestionResult]] = QuestionResult

    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled()


@dataclass(frozen=True, kw_only=True)
class Navigation:
    """A choice among `actions` as the answer to `question` (the instruction in the navigation prompt) about `frame`.
    It has no view: navigation always sees the overview."""

    frame: Frame
    question: str
    actions: list[str]
    timeout_s: float
    received: float = field(default_factory=time.monotonic)
    priority: ClassVar[Priority] = Priority.NAVIGATION
    result_type: ClassVar[type[NavigationResult]] = NavigationResult


Request = Question | Navigation


class InferenceWorker:
    """The one thread that runs inference (the model is not thread-safe), fed by a bounded priority queue."""

    def __init__(self, vlm: MobileVLM, max_queue: int):
        self.vlm = vlm
        self.max_queue = max_queue
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._session: tuple[Frame, View, Session | PerTileSession] | None = None  # the last frame's, for its next request
        self._stopped = ""  # why the worker stopped ("node is deactivating", ...); empty while it serves
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

    def submit(self, request: Request) -> Future[Result]:
        """Queue `request`; its result completes the returned future (from the worker thread). A full queue or a
        stopped worker completes it at once, in this thread, with "busy: queue full (N)" or the reason it stopped."""
        future: Future[Result] = Future()
        with self._lock:  # executor threads submit concurrently: check and put as one step
            if self._stopped:
                refusal = self._stopped
            elif self._queue.qsize() >= self.max_queue:
                refusal = f"busy: queue full ({self.max_queue})"
            else:
                self._queue.put((request.priority, next(self._order), request, future))
                self.max_depth = max(self.max_depth, self._queue.qsize())
                return future
        future.set_result(request.result_type(error=refusal))
        return future

    def stop(self, reason: str, timeout_s: float = 5.0) -> None:
        """Interrupt the request in flight, fail it, the queued ones and any submitted later with `reason`, and end the
        thread (waiting at most `timeout_s` for the request in flight: a navigation's scoring cannot be interrupted)."""
        with self._lock:
            self._stopped = reason
        self._queue.put((-1, -1, None, None))
        self._thread.join(timeout_s)
        while True:
            try:
                _, _, request, future = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                _deliver(request, future, request.result_type(error=reason))

    def _run(self) -> None:
        while True:
            _, _, request, future = self._queue.get()
            if request is None:
                return
            if self._stopped:
                _deliver(request, future, request.result_type(error=self._stopped))
                return
            self.busy = True
            try:
                result = self._answer(request)
            except MobileVLMError as error:
                result = request.result_type(error=str(error))
            except Exception as error:  # a bug must cost one request, never the worker
                logger.exception("inference failed")
                result = request.result_type(error=f"internal error: {type(error).__name__}: {error}")
            finally:
                self.busy = False
            _deliver(request, future, result)

    def _answer(self, request: Request) -> Result:
        deadline = request.received + request.timeout_s
        if time.monotonic() > deadline:
            return request.result_type(error=f"timeout: waited more than {request.timeout_s:g} s in the queue")
        if isinstance(request, Navigation):
            return self._choose(request)
        if request.is_cancelled():
            return QuestionResult(error="canceled")
        return self._generate(request, deadline)

    def _choose(self, request: Navigation) -> NavigationResult:
        session = self._session_for(request.frame, OVERVIEW)  # an overview Session: the only view with `choose`
        choice = session.choose(request.question, request.actions)
        return NavigationResult(action=choice.option, confidence=choice.confidence, scores=choice.scores,
                                prompt_tokens=session.prompt_tokens)

    def _generate(self, request: Question, deadline: float) -> QuestionResult:
        def should_stop() -> bool:
            return bool(self._stopped) or request.is_cancelled() or time.monotonic() > deadline

        session = self._session_for(request.frame, request.view)
        answer = session.ask(request.text, request.params, request.on_text, should_stop)
        result = QuestionResult(answer=answer.text, prompt_tokens=answer.prompt_tokens, generated_tokens=answer.generated_tokens)
        if answer.interrupted:
            if self._stopped:
                result.error = self._stopped
            elif request.is_cancelled():
                result.error = "canceled"
            else:
                result.error = f"timeout: no answer within {request.timeout_s:g} s"
        return result

    def _session_for(self, frame: Frame, view: View) -> Session | PerTileSession:
        """The session of `frame` seen as `view`: reused when the previous request asked about the same ones."""
        if self._session is None or self._session[0] is not frame or self._session[1] != view:
            self._session = (frame, view, self.vlm.session(frame.to_rgb(), mode=view.mode, roi=view.roi, max_tiles=view.max_tiles))
        return self._session[2]


def _deliver(request: Request, future: Future[Result], result: Result) -> None:
    """Complete `future` with `result`, stamped with the request's frame and latency. A failing done-callback costs
    that response, never the worker thread (concurrent.futures logs it)."""
    future.set_result(replace(result, frame=request.frame, latency_s=time.monotonic() - request.received))
