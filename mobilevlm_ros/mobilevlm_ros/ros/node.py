"""`mobilevlm_node`: MobileVLM as a ROS 2 lifecycle node.

configure loads the model; activate subscribes to the cameras and offers `~/vqa`, `~/navigate`, the `~/ask` action
and the `~/query` -> `~/answer` topics; deactivate and cleanup undo that. Callbacks only validate and queue: the
inference worker thread answers, and the request callbacks (services, action, `~/query`) are coroutines that await
its result, so the executor keeps serving while the model runs. Parameters are read from one typed object,
`self.params`, which the set-parameters callback replaces after checking a change by the rules configure applies.
"""

import concurrent.futures
import functools
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from lifecycle_msgs.msg import State
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
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
from mobilevlm_ros.ros.image_conversion import rgb_to_image
from mobilevlm_ros.ros.parameters import ConfigurationError, Parameters, changed, check_parameters, declare_parameters
from mobilevlm_ros.ros.worker import (
    InferenceWorker, Navigation, NavigationResult, Question, QuestionResult, Request, Result, View,
)
from mobilevlm_ros.runtime.navigation import navigation_question
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.vlm import MobileVLM

NODE_NAME = "mobilevlm_node"


# Requests wait in the middleware until an executor thread takes them. Services default to KEEP_LAST(10): a burst of
# more than 10 requests would silently drop the oldest, whose clients then never hear back. Keep them all: callbacks
# answer at once (busy when the queue is full), so the backlog drains.
REQUEST_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)

ResultT = TypeVar("ResultT", bound=Result)


class OpenRequests:
    """Requests whose response has not been handed to rclpy yet, counted from every executor thread, so shutdown can
    wait for them to go out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count


def tracked(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Count a request callback (a coroutine) as open until its response is ready."""

    @functools.wraps(callback)
    async def wrapper(self: "MobileVLMNode", *args: Any) -> Any:
        with self.open_requests:
            return await callback(self, *args)

    return wrapper


class MobileVLMNode(LifecycleNode):
    def __init__(self, **kwargs: Any):
        super().__init__(NODE_NAME, **kwargs)
        self.params: Parameters = declare_parameters(self)  # replaced (never changed in place) when a parameter is set
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.vlm: MobileVLM | None = None
        self.worker: InferenceWorker | None = None
        self.frames: FrameStore | None = None
        self.stats = RequestStats()
        self.configure_error = ""
        self.open_requests = OpenRequests()
        self._active_entities: list[tuple[Callable[[Any], Any], Any]] = []
        self._request_group = ReentrantCallbackGroup()  # request coroutines interleave while they await the worker
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(self.params.diagnostics_period_s, self._publish_diagnostics)

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Check a run-time change by the rules configure applies; a refusal says why (`ros2 param set` prints it)."""
        configured = self._state_machine.current_state[0] != State.PRIMARY_STATE_UNCONFIGURED
        try:
            self.params = changed(self.params, {parameter.name: parameter.value for parameter in parameters}, configured)
        except ConfigurationError as error:
            return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

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
        self.worker = InferenceWorker(self.vlm, self.params.max_queue)
        self.worker.start()
        self._create_interfaces()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.vlm = self.frames = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        self.vlm = self.frames = None
        return TransitionCallbackReturn.SUCCESS

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
            llama_amx=AMX_SETTINGS[p.llama_amx],
        )

    def _create_interfaces(self) -> None:
        p = self.params
        camera_qos = QoSProfile(
            depth=p.qos_depth,
            reliability=ReliabilityPolicy.BEST_EFFORT if p.qos_reliability == "best_effort" else ReliabilityPolicy.RELIABLE,
            durability=qos_profile_sensor_data.durability,
            history=qos_profile_sensor_data.history,
        )
        for camera, topic, transport in zip(p.cameras, p.camera_topics, p.camera_transports):
            msg_type, topic = (CompressedImage, f"{topic}/compressed") if transport == "compressed" else (Image, topic)
            subscription = self.create_subscription(msg_type, topic, self._frame_callback(camera), camera_qos)
            self._active_entities.append((self.destroy_subscription, subscription))
        self.answer_publisher = self.create_publisher(Answer, "~/answer", 10)
        self.debug_publisher = self.create_publisher(Image, "~/debug_image", qos_profile_sensor_data)
        self._active_entities += [
            (self.destroy_publisher, self.answer_publisher),
            (self.destroy_publisher, self.debug_publisher),
            (self.destroy_subscription, self.create_subscription(String, "~/query", self._on_query, 10,
                                                                 callback_group=self._request_group)),
            (self.destroy_service, self.create_service(VisualQuery, "~/vqa", self._on_vqa, qos_profile=REQUEST_QOS,
                                                       callback_group=self._request_group)),
            (self.destroy_service, self.create_service(NavigationInstruction, "~/navigate", self._on_navigate, qos_profile=REQUEST_QOS,
                                                       callback_group=self._request_group)),
        ]
        action = ActionServer(
            self, Ask, "~/ask", execute_callback=self._execute_ask, goal_callback=self._on_ask_goal,
            cancel_callback=lambda goal: CancelResponse.ACCEPT, callback_group=self._request_group,
            goal_service_qos_profile=REQUEST_QOS, result_service_qos_profile=REQUEST_QOS, cancel_service_qos_profile=REQUEST_QOS,
        )
        self._active_entities.append((ActionServer.destroy, action))

    def _release_active(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        for destroy, entity in reversed(self._active_entities):
            destroy(entity)
        self._active_entities.clear()

    def finish_requests(self, executor: MultiThreadedExecutor, timeout_s: float) -> None:
        """Stop the worker (the request in flight and the queued ones fail with "node is shutting down") and spin
        until every response has gone out, or `timeout_s` has passed."""
        if self.worker is not None:
            self.worker.stop(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.open_requests.count and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        for _ in range(5):  # let the executor hand the last responses to the middleware
            executor.spin_once(timeout_sec=0.01)

    # ---- requests ---------------------------------------------------------------------------------------------------

    def _frame_callback(self, camera: str) -> Callable[[Image | CompressedImage], None]:
        def store(msg: Image | CompressedImage) -> None:
            self.frames.put(camera, msg, self.get_clock().now().nanoseconds)

        return store

    def _frame(self, p: Parameters, what: str, text: str, camera: str, image: Image) -> Frame:
        """The frame a request asks about: the image in the request, else the camera's latest at request time. Raises
        MobileVLMError when the node is not active, `text` is empty or too long, or there is no usable frame."""
        if self.worker is None:
            raise MobileVLMError("node is not active")
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
        """The result of a question: refused here (inactive, empty, too long, no usable frame) or the worker's."""
        try:
            question = self._question(query, on_text, cancelled)
        except MobileVLMError as error:
            return self._finished(QuestionResult(error=str(error)))
        return self._finished(await self._submit(question))

    async def _choose(self, request: NavigationInstruction.Request, actions: list[str]) -> NavigationResult:
        """The result of a navigation: refused here or the worker's."""
        try:
            navigation = self._navigation(request, actions)
        except MobileVLMError as error:
            return self._finished(NavigationResult(error=str(error)))
        return self._finished(await self._submit(navigation))

    async def _submit(self, request: Request) -> Result:
        """Queue `request` on the worker and await its result: the worker's future completes an rclpy future, so this
        coroutine yields to the executor meanwhile."""
        result = Future(executor=self.executor)

        def resolve(done: concurrent.futures.Future) -> None:
            result.set_result(done.result())
            if self.executor is not None:
                self.executor.wake()

        self.worker.submit(request).add_done_callback(resolve)
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
    async def _on_navigate(self, request: NavigationInstruction.Request, response: NavigationInstruction.Response) -> NavigationInstruction.Response:
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
        """`~/query`: answer about the default camera's latest frame on `~/answer` (and draw it on `~/debug_image`)."""
        result = await self._answer(VisualQuery.Request(question=msg.data))
        answer = Answer(camera=self._camera(result, ""), question=msg.data, answer=result.answer, success=result.success,
                        error=result.error, latency_s=result.latency_s)
        if result.frame is not None:
            answer.header = result.frame.msg.header
        self._publish_debug_image(msg.data, result)
        self.answer_publisher.publish(answer)

    def _camera(self, result: Result, requested: str) -> str:
        """The camera a response names: the answered frame's, else the requested one, else the default camera."""
        return result.frame.camera if result.frame is not None else (requested or self.params.default_camera)

    def _fill(self, response: Any, result: Result, camera: str) -> None:
        """The fields every response shares: success, error, stamp and camera of the frame, latency."""
        response.success, response.error, response.latency_s = result.success, result.error, result.latency_s
        response.camera = self._camera(result, camera)
        if result.frame is not None:
            response.image_stamp = result.frame.stamp

    def _publish_debug_image(self, question: str, result: Result) -> None:
        """The answered frame with the question and the answer (or the chosen action) drawn, for whoever watches."""
        if result.frame is None or not self.params.debug_image or self.debug_publisher.get_subscription_count() == 0:
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
        self.debug_publisher.publish(rgb_to_image(draw_caption(rgb, [f"Q: {question}", f"A: {text}"]), result.frame.msg.header))

    # ---- diagnostics ------------------------------------------------------------------------------------------------

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: inference", hardware_id="mobilevlm")
        values = {"lifecycle state": self._state_machine.current_state[1]}
        if self.configure_error:
            status.level, status.message = DiagnosticStatus.ERROR, f"not configured: {self.configure_error}"
        elif self.worker is None:
            status.level, status.message = DiagnosticStatus.WARN, "inactive"
        else:
            status.level, status.message = DiagnosticStatus.OK, "serving"
        if self.vlm is not None:
            values |= {"model": str(self.params.model_dir), "projector": self.vlm.config.mm_projector_type,
                       "vision backend": self.vlm.vision.name, "language backend": self.vlm.language.name,
                       "device": str(self.vlm.device)}
        if self.worker is not None:
            values |= {"queue depth": str(self.worker.depth), "max queue depth": str(self.worker.max_depth),
                       "max queue": str(self.worker.max_queue), "busy": str(self.worker.busy)}
        if self.frames is not None:
            now = self.get_clock().now().nanoseconds
            for camera, stats in self.frames.snapshot().items():
                values[f"camera {camera}: frames"] = str(stats.frames)
                values[f"camera {camera}: age (s)"] = f"{(now - stats.last.stamp_ns) / 1e9:.2f}" if stats.last else "no frame yet"
            if status.level == DiagnosticStatus.OK and (silent := self._silent_cameras(now)):
                status.level, status.message = DiagnosticStatus.WARN, "; ".join(silent)
        values |= self.stats.summary()
        status.values = [KeyValue(key=key, value=value) for key, value in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diagnostics.publish(array)

    def _silent_cameras(self, now_ns: int) -> list[str]:
        """Why each camera has no usable frame (by the same max_frame_age_s rule as requests); empty when all do."""
        max_age_s = self.params.max_frame_age_s
        if not max_age_s:
            return []
        silent = []
        for camera in self.frames.cameras:
            try:
                self.frames.latest(camera, now_ns, max_age_s)
            except FrameError as error:
                silent.append(str(error))
        return silent


def main(args: list[str] | None = None) -> int:
    """Console script `mobilevlm_node`: serve until SIGINT or SIGTERM, then answer or fail what is open and exit."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Our own signal handling: rclpy's would shut the context down before the open requests are answered.
    rclpy.init(args=args if args is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    node = MobileVLMNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    if node.params.autostart and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
        node.trigger_activate()
    try:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)  # wakes up often enough to notice a signal
        started = time.monotonic()
        node.finish_requests(executor, timeout_s=3.0)
        node.trigger_shutdown()
        node.get_logger().info(f"stopped in {time.monotonic() - started:.2f} s")
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
