"""`mobilevlm_node`: MobileVLM as a ROS 2 lifecycle node.

configure loads the model; activate starts the inference worker and subscribes to the cameras; deactivate and cleanup
undo that. `~/vqa`, `~/navigate`, the `~/ask` action, `~/query` -> `~/answer` and the debug images exist for the
node's whole life: a request outside the active state fails at once with the reason ("node is not active"), as the
ROS 2 lifecycle design has managed services do, so no entity is ever destroyed under a request in flight.

Callbacks only validate and queue: the inference worker thread answers, and the request callbacks are coroutines that
await its result, so the executor keeps serving while the model runs. Transitions run in a callback group of their
own: a configure that loads a model for minutes holds one executor thread, while the others answer get_state,
/diagnostics, parameters and requests. Deactivate and shutdown stop the worker with their reason ("node is
deactivating"), which fails every queued or running request, and wait (bounded) until those responses are out.
Parameters are read from one typed object, `self.params`, which the set-parameters callback replaces after checking a
change by the rules configure applies.
"""

import concurrent.futures
import functools
import itertools
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from lifecycle_msgs.msg import State
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.impl.rcutils_logger import RcutilsLogger
from rclpy.lifecycle import LifecycleNodeMixin, LifecycleState, TransitionCallbackReturn
from rclpy.logging import LoggingSeverity
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from rclpy.subscription import Subscription
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from mobilevlm_interfaces.action import Ask
from mobilevlm_interfaces.msg import Answer
from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.choices import AMX_SETTINGS
from mobilevlm_ros.errors import MobileVLMError
from mobilevlm_ros.model.prompt import check_question
from mobilevlm_ros.ros.debug_image import draw_caption
from mobilevlm_ros.ros.diagnostics import RequestStats
from mobilevlm_ros.ros.frames import Frame, FrameError, FrameStore
from mobilevlm_ros.ros.image_conversion import rgb_to_compressed, rgb_to_image
from mobilevlm_ros.ros.parameters import (
    CAMERA_QOS_CHECK_S,
    ConfigurationError,
    Parameters,
    changed,
    check_parameters,
    declare_parameters,
)
from mobilevlm_ros.ros.worker import (
    InferenceWorker,
    Navigation,
    NavigationResult,
    Question,
    QuestionResult,
    Request,
    Result,
    View,
)
from mobilevlm_ros.runtime.navigation import navigation_question
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.vlm import MobileVLM

NODE_NAME = "mobilevlm_node"
LIBRARY_LOGGER = "mobilevlm_ros"

# Requests wait in the middleware until an executor thread takes them. Services default to KEEP_LAST(10): a burst of
# more than 10 requests would silently drop the oldest, whose clients then never hear back. Keep them all: callbacks
# answer at once (busy when the queue is full), so the backlog drains.
REQUEST_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
# What RViz2's Image display and image_view subscribe with, and a viewer that starts later still gets the last image.
DEBUG_IMAGE_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FINISH_REQUESTS_S = 5.0  # how long deactivate and shutdown wait for the responses of the requests they fail
# What a request is told while the node does not serve, by lifecycle state.
NOT_SERVING = {
    "unconfigured": "node is not configured", "configuring": "node is configuring", "inactive": "node is not active",
    "activating": "node is activating", "deactivating": "node is deactivating", "cleaningup": "node is cleaning up",
    "shuttingdown": "node is shutting down", "finalized": "node is shut down", "errorprocessing": "node is in error",
}

ResultT = TypeVar("ResultT", bound=Result)


class OpenRequests:
    """Requests whose response has not been handed to rclpy yet, counted from every executor thread, so that a
    transition can wait for them."""

    def __init__(self) -> None:
        self._idle = threading.Condition()
        self.count = 0

    def __enter__(self) -> None:
        with self._idle:
            self.count += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._idle:
            self.count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether none is open within `timeout_s`."""
        with self._idle:
            return self._idle.wait_for(lambda: self.count == 0, timeout_s)


def tracked(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Count a request callback (a coroutine) as open until its response is ready."""

    @functools.wraps(callback)
    async def wrapper(self: "MobileVLMNode", *args: Any) -> Any:
        with self.open_requests:
            return await callback(self, *args)

    return wrapper


class LibraryLogHandler(logging.Handler):
    """The library's Python log records, written through the node's logger: they reach /rosout, the console and the
    ROS log file like the node's own lines. Records keep their logger's name in the text, because /rosout carries only
    the node's logger on Humble (child loggers reach it from Iron on)."""

    def __init__(self, logger: RcutilsLogger):
        super().__init__()
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            severity = LoggingSeverity(min(max(record.levelno // 10 * 10, 10), 50))  # the numbers of Python's levels
            self.logger.log(f"[{record.name}] {self.format(record)}", severity)  # the message, and a traceback if any
        except Exception:  # as logging's own handlers: a record that cannot be written must not fail its caller
            self.handleError(record)


@dataclass
class CameraSubscription:
    camera: str
    topic: str
    msg_type: type[Image] | type[CompressedImage]
    subscription: Subscription
    reliable: bool


@dataclass
class CameraReport:
    values: dict[str, str]  # diagnostic key -> value
    problems: list[str]  # what makes the status a warning


class MobileVLMNode(LifecycleNodeMixin, Node):
    """A lifecycle node, built from rclpy's two parts of LifecycleNode so that the lifecycle services get a callback
    group of their own."""

    def __init__(self, **kwargs: Any):
        Node.__init__(self, NODE_NAME, **kwargs)
        # Reentrant: get_state answers while a configure loads a model on another thread. A second transition asked
        # meanwhile is refused by the state machine, as from any transition state.
        LifecycleNodeMixin.__init__(self, callback_group=ReentrantCallbackGroup())
        self.params: Parameters = declare_parameters(self)  # replaced (never changed in place) when a parameter is set
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.vlm: MobileVLM | None = None
        self.worker: InferenceWorker | None = None  # set while the node serves; a request captures it once
        self.frames: FrameStore | None = None
        self.stats = RequestStats()
        self.configure_error = ""
        self.open_requests = OpenRequests()
        self._queries = itertools.count(1)
        self._cameras: list[CameraSubscription] = []
        self._cameras_lock = threading.Lock()  # activate, deactivate and the QoS check change them from their threads
        self._log_handler = LibraryLogHandler(self.get_logger())
        library = logging.getLogger(LIBRARY_LOGGER)
        library.addHandler(self._log_handler)
        library.setLevel(int(self.get_logger().get_effective_level()))
        self._create_request_interfaces()
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(self.params.diagnostics_period_s, self._publish_diagnostics)
        self.create_timer(CAMERA_QOS_CHECK_S, self._follow_camera_qos)

    def destroy_node(self) -> None:
        """Everything, the action server too: rclpy's destroy_node leaves it to the garbage collector, and with it the
        node and the DDS participant that it keeps alive."""
        logging.getLogger(LIBRARY_LOGGER).removeHandler(self._log_handler)
        self.ask_server.destroy()
        super().destroy_node()

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Check a run-time change by the rules configure applies; a refusal says why (`ros2 param set` prints it)."""
        configured = self._state_machine.current_state[0] != State.PRIMARY_STATE_UNCONFIGURED
        try:
            self.params = changed(self.params, {parameter.name: parameter.value for parameter in parameters}, configured)
        except ConfigurationError as error:
            return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

    def _create_request_interfaces(self) -> None:
        group = ReentrantCallbackGroup()  # request coroutines interleave while they await the worker
        self.answer_publisher = self.create_publisher(Answer, "~/answer", 10)
        self.debug_publisher = self.create_publisher(Image, "~/debug_image", DEBUG_IMAGE_QOS)
        self.debug_compressed_publisher = self.create_publisher(CompressedImage, "~/debug_image/compressed",
                                                                DEBUG_IMAGE_QOS)
        self.create_subscription(String, "~/query", self._on_query, 10, callback_group=group)
        self.create_service(VisualQuery, "~/vqa", self._on_vqa, qos_profile=REQUEST_QOS, callback_group=group)
        self.create_service(NavigationInstruction, "~/navigate", self._on_navigate, qos_profile=REQUEST_QOS,
                            callback_group=group)
        self.ask_server = ActionServer(
            self, Ask, "~/ask", execute_callback=self._execute_ask, goal_callback=self._on_ask_goal,
            cancel_callback=lambda goal: CancelResponse.ACCEPT, callback_group=group,
            goal_service_qos_profile=REQUEST_QOS, result_service_qos_profile=REQUEST_QOS,
            cancel_service_qos_profile=REQUEST_QOS,
        )

    # ---- lifecycle ------------------------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            check_parameters(self.params)
            self.vlm = self._load_model()
        except MobileVLMError as error:
            self.configure_error = str(error)
            self.get_logger().error(f"configure failed: {error}")
            return TransitionCallbackReturn.FAILURE
        except Exception as error:  # a model directory the loader did not foresee must not take the node down
            self.configure_error = f"{self.params.model_dir}: {type(error).__name__}: {error}"
            self.get_logger().error(f"configure failed: {self.configure_error}\n{traceback.format_exc()}")
            return TransitionCallbackReturn.FAILURE
        self.configure_error = ""
        self.frames = FrameStore(self.params.cameras)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        worker = InferenceWorker(self.vlm, self.params.max_queue)
        worker.start()
        self._subscribe_cameras()
        self.worker = worker
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.vlm = self.frames = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        self.vlm = self.frames = None
        return TransitionCallbackReturn.SUCCESS

    def _stop_serving(self) -> None:
        """New requests are refused, the queued and running ones fail, with the transition's reason ("node is
        deactivating"); then the cameras are unsubscribed and this waits (bounded) until every response is out."""
        worker, self.worker = self.worker, None
        if worker is None:
            return
        reason = self._not_serving()
        worker.stop(reason, FINISH_REQUESTS_S)
        self._unsubscribe_cameras()
        if not self.open_requests.wait_idle(FINISH_REQUESTS_S):
            self.get_logger().warning(
                f"{reason}: {self.open_requests.count} requests still open after {FINISH_REQUESTS_S:g} s")

    def _not_serving(self) -> str:
        """What a request is told while the node does not serve: its lifecycle state, in words."""
        label = self._state_machine.current_state[1]
        return NOT_SERVING.get(label, f"node is {label}")

    def _load_model(self) -> MobileVLM:
        p = self.params
        self.get_logger().info(f"loading {p.model_dir} (vision {p.vision_backend}, language {p.language_backend})")
        return MobileVLM.from_pretrained(
            p.model_dir,
            device=None if p.device == "auto" else p.device,
            language=p.language_backend,
            quant=p.quant,
            vision=p.vision_backend,
            vision_precision=p.vision_precision,
            engines_dir=p.engines_dir or None,
            build=p.engine_build,
            engine_path=p.engine_path or None,
            llama_amx=AMX_SETTINGS[p.llama_amx],
        )

    # ---- cameras ----------------------------------------------------------------------------------------------------

    def _subscribe_cameras(self) -> None:
        p = self.params
        with self._cameras_lock:
            for camera, topic, transport in zip(p.cameras, p.camera_topics, p.camera_transports, strict=True):
                compressed = transport == "compressed"
                msg_type, topic = (CompressedImage, f"{topic}/compressed") if compressed else (Image, topic)
                self._cameras.append(self._camera_subscription(camera, topic, msg_type, self._reliable(topic)))

    def _unsubscribe_cameras(self) -> None:
        with self._cameras_lock:
            for camera in self._cameras:
                self.destroy_subscription(camera.subscription)
            self._cameras.clear()

    def _reliable(self, topic: str) -> bool:
        """Whether the subscription to `topic` is reliable: qos_reliability, or with auto, whether the topic has
        publishers and all of them are reliable (a best-effort publisher would not connect to a reliable
        subscription; a reliable one loses large frames to a best-effort subscription, see the README)."""
        if self.params.qos_reliability != "auto":
            return self.params.qos_reliability == "reliable"
        publishers = self.get_publishers_info_by_topic(topic)
        return bool(publishers) and all(info.qos_profile.reliability == ReliabilityPolicy.RELIABLE
                                        for info in publishers)

    def _camera_subscription(self, camera: str, topic: str, msg_type: type[Image] | type[CompressedImage],
                             reliable: bool) -> CameraSubscription:
        """A subscription that stores the camera's frames (in the store of this activation: a frame that arrives
        while the node deactivates lands in the store being left)."""
        frames = self.frames
        qos = QoSProfile(
            depth=self.params.qos_depth,
            reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
            durability=qos_profile_sensor_data.durability, history=qos_profile_sensor_data.history,
        )

        def store(msg: Image | CompressedImage) -> None:
            frames.put(camera, msg, self.get_clock().now().nanoseconds)

        subscription = self.create_subscription(msg_type, topic, store, qos)
        return CameraSubscription(camera, topic, msg_type, subscription, reliable)

    def _follow_camera_qos(self) -> None:
        """With qos_reliability auto, subscribe again to a camera whose publishers' reliability has changed (a driver
        started after the node, or restarted with other settings)."""
        if self.params.qos_reliability != "auto":
            return
        with self._cameras_lock:
            for index, camera in enumerate(self._cameras):
                reliable = self._reliable(camera.topic)
                if reliable != camera.reliable:
                    self.get_logger().info(f"camera '{camera.camera}': subscribing "
                                           f"{'reliable' if reliable else 'best effort'} to {camera.topic}, as its "
                                           "publishers now are")
                    self.destroy_subscription(camera.subscription)
                    self._cameras[index] = self._camera_subscription(camera.camera, camera.topic, camera.msg_type,
                                                                     reliable)

    # ---- requests ---------------------------------------------------------------------------------------------------

    def _serving(self) -> InferenceWorker:
        """The worker, captured once per request: a transition may stop it at any time, and a request queued on it
        then fails with the transition's reason. Raises MobileVLMError when the node does not serve."""
        worker = self.worker
        if worker is None:
            raise MobileVLMError(self._not_serving())
        return worker

    def _frame(self, p: Parameters, what: str, text: str, camera: str, image: Image) -> Frame:
        """The frame a request asks about: the image in the request, else the camera's latest at request time. Raises
        MobileVLMError when `text` is empty or too long, or there is no usable frame."""
        check_question(text, what)
        if len(text) > p.max_question_chars:
            raise MobileVLMError(f"{what} is {len(text)} characters; the limit is {p.max_question_chars} (max_question_chars)")
        camera = camera or p.default_camera
        now = self.get_clock().now().nanoseconds
        if image.data:
            return Frame(camera, image, now)  # decoded (and checked) on the worker thread like camera frames
        return self.frames.latest(camera, now, p.max_frame_age_s)

    def _question(self, query: VisualQuery.Request | Ask.Goal, on_text: Callable[[str, int], None] | None,
                  cancelled: Callable[[], bool] | None) -> Question:
        """A question seen as `query.mode`; empty: crop when `query.roi` has a size, else the image_mode parameter.
        The mode and region are checked against the frame on the worker."""
        p = self.params
        frame = self._frame(p, "question", query.question, query.camera, query.image)
        roi = query.roi
        region = (roi.x_offset, roi.y_offset, roi.width, roi.height) if roi.width or roi.height else None
        return Question(
            frame=frame, text=query.question, view=View(query.mode or ("crop" if region else p.image_mode), region, p.max_tiles),
            params=SamplingParams(max_new_tokens=query.max_new_tokens or p.max_new_tokens, temperature=p.temperature),
            timeout_s=p.request_timeout_s, on_text=on_text, cancelled=cancelled,
        )

    def _navigation(self, request: NavigationInstruction.Request, actions: list[str]) -> Navigation:
        """A choice among `actions`; a Navigation has no view, so the worker shows it the overview."""
        p = self.params
        frame = self._frame(p, "instruction", request.instruction, request.camera, request.image)
        return Navigation(frame=frame, question=navigation_question(request.instruction, actions, p.navigation_prompt),
                          actions=actions, timeout_s=p.request_timeout_s)

    async def _answer(self, query: VisualQuery.Request | Ask.Goal, on_text: Callable[[str, int], None] | None = None,
                      cancelled: Callable[[], bool] | None = None) -> QuestionResult:
        """The result of a question: refused here (not serving, empty, too long, no usable frame) or the worker's."""
        try:
            worker = self._serving()
            question = self._question(query, on_text, cancelled)
        except MobileVLMError as error:
            return self._finished(QuestionResult(error=str(error)))
        return self._finished(await self._submit(worker, question))

    async def _choose(self, request: NavigationInstruction.Request, actions: list[str]) -> NavigationResult:
        """The result of a navigation: refused here or the worker's."""
        try:
            worker = self._serving()
            navigation = self._navigation(request, actions)
        except MobileVLMError as error:
            return self._finished(NavigationResult(error=str(error)))
        return self._finished(await self._submit(worker, navigation))

    async def _submit(self, worker: InferenceWorker, request: Request) -> Result:
        """Queue `request` on the worker and await its result: the worker's future completes an rclpy future, so this
        coroutine yields to the executor meanwhile."""
        result = Future(executor=self.executor)

        def resolve(done: concurrent.futures.Future) -> None:
            result.set_result(done.result())
            if self.executor is not None:
                self.executor.wake()

        worker.submit(request).add_done_callback(resolve)
        return await result

    def _finished(self, result: ResultT) -> ResultT:
        """Every request's result passes here once: counted for /diagnostics, a failure logged."""
        self.stats.record(result.success, result.error, result.latency_s)
        if not result.success:
            self.get_logger().warning(f"request failed: {result.error}")
        return result

    @tracked
    async def _on_vqa(self, request: VisualQuery.Request, response: VisualQuery.Response) -> VisualQuery.Response:
        result = await self._answer(request)
        self._fill(response, result, request.camera)
        response.answer = result.answer
        response.prompt_tokens, response.generated_tokens = result.prompt_tokens, result.generated_tokens
        self._publish_debug_image(request.question, result)
        return response

    @tracked
    async def _on_navigate(
        self, request: NavigationInstruction.Request, response: NavigationInstruction.Response
    ) -> NavigationInstruction.Response:
        actions = list(request.actions) or self.params.navigation_actions
        result = await self._choose(request, actions)
        self._fill(response, result, request.camera)
        response.actions = actions
        if result.success:
            response.action, response.confidence = result.action, result.confidence
            response.scores = [result.scores[action] for action in actions]
        self._publish_debug_image(request.instruction, result)
        return response

    def _on_ask_goal(self, goal: Ask.Goal) -> GoalResponse:
        return GoalResponse.ACCEPT if self.worker is not None else GoalResponse.REJECT

    @tracked
    async def _execute_ask(self, goal_handle: Any) -> Ask.Result:
        def feedback(text: str, tokens: int) -> None:
            goal_handle.publish_feedback(Ask.Feedback(partial_answer=text, generated_tokens=tokens))

        result = await self._answer(goal_handle.request, feedback, lambda: goal_handle.is_cancel_requested)
        response = Ask.Result()
        self._fill(response, result, goal_handle.request.camera)
        response.answer = result.answer
        response.prompt_tokens, response.generated_tokens = result.prompt_tokens, result.generated_tokens
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return response

    @tracked
    async def _on_query(self, msg: String) -> None:
        """`~/query`: answer about the default camera's latest frame on `~/answer` (and draw it on `~/debug_image`),
        numbered in the order the queries arrive."""
        query_id = next(self._queries)
        result = await self._answer(VisualQuery.Request(question=msg.data))
        answer = Answer(query_id=query_id, camera=self._camera(result, ""), question=msg.data, answer=result.answer,
                        success=result.success, error=result.error, latency_s=result.latency_s)
        if result.frame is not None:
            answer.header = result.frame.msg.header
        self._publish_debug_image(msg.data, result)
        self.answer_publisher.publish(answer)

    def _camera(self, result: Result, requested: str) -> str:
        """The camera a response names: the answered frame's, else the requested one, else the default camera."""
        return result.frame.camera if result.frame is not None else (requested or self.params.default_camera)

    def _fill(self, response: Any, result: Result, camera: str) -> None:
        """The fields every response shares: success, error, header and camera of the frame, latency."""
        response.success, response.error, response.latency_s = result.success, result.error, result.latency_s
        response.camera = self._camera(result, camera)
        if result.frame is not None:
            response.header = result.frame.msg.header

    def _publish_debug_image(self, question: str, result: Result) -> None:
        """The answered frame with the question and the answer (or the chosen action) drawn, raw and jpeg, each only
        while someone subscribes."""
        publishers = [publisher for publisher in (self.debug_publisher, self.debug_compressed_publisher)
                      if publisher.get_subscription_count()]
        if result.frame is None or not self.params.debug_image or not publishers:
            return
        try:
            rgb = result.frame.to_rgb()
        except MobileVLMError:
            return
        if not result.success:
            text = f"error: {result.error}"
        elif isinstance(result, NavigationResult):
            text = f"{result.action} ({result.confidence:.2f})"
        else:
            text = result.answer
        drawn, header = draw_caption(rgb, [f"Q: {question}", f"A: {text}"]), result.frame.msg.header
        for publisher in publishers:
            raw = publisher is self.debug_publisher
            publisher.publish(rgb_to_image(drawn, header) if raw else rgb_to_compressed(drawn, header))

    # ---- diagnostics ------------------------------------------------------------------------------------------------

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: inference", hardware_id="mobilevlm")
        values = {"lifecycle state": self._state_machine.current_state[1]}
        if self.configure_error:
            status.level, status.message = DiagnosticStatus.ERROR, f"not configured: {self.configure_error}"
        elif self.worker is None:
            status.level, status.message = DiagnosticStatus.WARN, self._not_serving()
        else:
            status.level, status.message = DiagnosticStatus.OK, "serving"
        if (vlm := self.vlm) is not None:
            values |= {"model": str(self.params.model_dir), "projector": vlm.config.mm_projector_type,
                       "vision backend": vlm.vision.name, "language backend": vlm.language.name,
                       "device": str(vlm.device)}
        if (worker := self.worker) is not None:
            values |= {"queue depth": str(worker.depth), "max queue depth": str(worker.max_depth),
                       "max queue": str(worker.max_queue), "busy": str(worker.busy)}
        if (frames := self.frames) is not None:
            cameras = self._camera_report(frames)
            values |= cameras.values
            if status.level == DiagnosticStatus.OK and cameras.problems:
                status.level, status.message = DiagnosticStatus.WARN, "; ".join(cameras.problems)
        values |= self.stats.summary()
        status.values = [KeyValue(key=key, value=value) for key, value in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)

    def _camera_report(self, frames: FrameStore) -> CameraReport:
        """Each camera's frames, age, rates and subscription, and why cameras have no usable frame (by the
        max_frame_age_s rule of requests) or lose frames."""
        now, max_age_s = self.get_clock().now().nanoseconds, self.params.max_frame_age_s
        reliability = {camera.camera: "reliable" if camera.reliable else "best effort"
                       for camera in list(self._cameras)}
        report = CameraReport({}, [])
        for camera, stats in frames.snapshot().items():
            report.values |= {
                f"camera {camera}: frames": str(stats.frames),
                f"camera {camera}: age (s)":
                    f"{(now - stats.last.stamp_ns) / 1e9:.2f}" if stats.last else "no frame yet",
                f"camera {camera}: received (Hz)": f"{stats.received_hz:.1f}" if stats.received_hz else "n/a",
                f"camera {camera}: stamped (Hz)": f"{stats.camera_hz:.1f}" if stats.camera_hz else "n/a",
            }
            if camera in reliability:
                report.values[f"camera {camera}: subscription"] = reliability[camera]
            try:
                if max_age_s:
                    frames.latest(camera, now, max_age_s)
            except FrameError as error:
                report.problems.append(str(error))
            else:
                if losing := stats.losing_frames():
                    report.problems.append(losing)
        return report

def main(args: list[str] | None = None) -> int:
    """Console script `mobilevlm_node`: serve until SIGINT or SIGTERM, then shut down (what is open fails with "node is
    shutting down", its responses sent) and exit. A second signal ends the process at once."""
    # Our own signal handling: rclpy's would shut the context down before the open requests are answered.
    rclpy.init(args=args if args is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # the second: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        stop.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    node = MobileVLMNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name="executor")
    spinner.start()  # before configure: get_state and /diagnostics answer while the model loads
    try:
        if node.params.autostart and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
        stop.wait()
        started = time.monotonic()
        if node._state_machine.current_state[0] != State.PRIMARY_STATE_FINALIZED:
            node.trigger_shutdown()
        # rclpy sends an action's result in a task of its own once the goal has ended: let the executor take the
        # tasks queued so far (in order, so this one comes last); shutting it down then waits for them.
        flushed = executor.create_task(lambda: None)
        deadline = time.monotonic() + 1.0
        while not flushed.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        node.get_logger().info(f"stopped in {time.monotonic() - started:.2f} s")
    finally:
        teardown(node, executor, spinner)
    return 0


def teardown(node: MobileVLMNode, executor: MultiThreadedExecutor, spinner: threading.Thread) -> None:
    """Destroy the executor, the node (all its entities) and the context here, in order, rather than leave any to the
    garbage collector at interpreter exit: a middleware teardown that blocks inside the collector holds the
    interpreter, so no Python signal handler can run (the process that ignored SIGTERM until launch killed it). Then
    the stop signals get their default action back, for anything native that still blocks on the way out."""
    executor.shutdown(timeout_sec=1.0)
    spinner.join()
    node.destroy_node()
    rclpy.try_shutdown()
    rclpy.get_default_context().destroy()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
