"""`mobilevlm_node`: MobileVLM as a ROS 2 lifecycle node.

configure loads the model; activate subscribes to the cameras and offers `~/vqa`, `~/navigate`, the `~/ask` action
and the `~/query` -> `~/answer` topics; deactivate and cleanup undo that. Callbacks only validate and queue: the
inference worker thread answers, and service/action callbacks are coroutines that await its result, so the
executor keeps serving while the model runs.
"""

import functools
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rclpy
from rclpy.signals import SignalHandlerOptions
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image, RegionOfInterest
from std_msgs.msg import String

from mobilevlm_interfaces.action import Ask
from mobilevlm_interfaces.msg import Answer
from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.demo import DEMO_CHECKPOINT
from mobilevlm_ros.errors import MobileVLMError
from mobilevlm_ros.model.prompt import check_question
from mobilevlm_ros.ros.debug_image import draw_caption
from mobilevlm_ros.ros.diagnostics import RequestStats
from mobilevlm_ros.ros.frames import Frame, FrameError, FrameStore
from mobilevlm_ros.ros.image_conversion import rgb_to_image
from mobilevlm_ros.ros.parameters import SPECS, declare_parameters, parameter_values
from mobilevlm_ros.ros.worker import Busy, InferenceWorker, Request, Result
from mobilevlm_ros.choices import AMX_SETTINGS
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.vlm import MobileVLM

NODE_NAME = "mobilevlm_node"


# Requests wait in the middleware until an executor thread takes them. Services default to KEEP_LAST(10): a burst of
# more than 10 requests would silently drop the oldest, whose clients then never hear back. Keep them all: callbacks
# answer at once (busy when the queue is full), so the backlog drains.
REQUEST_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


class ConfigurationError(MobileVLMError):
    """Parameters that cannot work together."""


def tracked(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Count a request callback as open until its response is ready, so shutdown can wait for it to go out."""

    @functools.wraps(callback)
    async def wrapper(self: "MobileVLMNode", *args: Any) -> Any:
        self.open_requests += 1
        try:
            return await callback(self, *args)
        finally:
            self.open_requests -= 1

    return wrapper


class MobileVLMNode(LifecycleNode):
    def __init__(self, **kwargs: Any):
        super().__init__(NODE_NAME, **kwargs)
        declare_parameters(self)
        self.params: dict[str, Any] = {}
        self.vlm: MobileVLM | None = None
        self.worker: InferenceWorker | None = None
        self.frames: FrameStore | None = None
        self.stats = RequestStats()
        self.configure_error = ""
        self.open_requests = 0  # requests whose response has not been handed to rclpy yet
        self._active_entities: list[tuple[Callable[[Any], Any], Any]] = []
        self._request_group = ReentrantCallbackGroup()  # service/action coroutines interleave while they await
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(self.get_parameter("diagnostics_period_s").value, self._publish_diagnostics)

    # ---- lifecycle ------------------------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.params = parameter_values(self)
        self.params["model_path"] = self.params["model_path"] or str(DEMO_CHECKPOINT)
        try:
            self._check_parameters()
            self.vlm = self._load_model()
        except MobileVLMError as error:
            self.configure_error = str(error)
            self.get_logger().error(f"configure failed: {error}")
            return TransitionCallbackReturn.FAILURE
        except Exception as error:  # a model directory the loader did not foresee must not take the node down
            self.configure_error = f"{self.params['model_path']}: {type(error).__name__}: {error}"
            self.get_logger().error(f"configure failed: {self.configure_error}\n{traceback.format_exc()}")
            return TransitionCallbackReturn.FAILURE
        self.configure_error = ""
        self.frames = FrameStore(self.params["cameras"])
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.worker = InferenceWorker(self.vlm, self.params["max_queue"], self.params["navigation_prompt"])
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

    def _check_parameters(self) -> None:
        p = self.params
        for spec in SPECS:
            if spec.choices and p[spec.name] not in spec.choices:
                raise ConfigurationError(f"parameter {spec.name}: {p[spec.name]!r} is not one of {', '.join(spec.choices)}")
        cameras = p["cameras"]
        if not cameras or len(set(cameras)) != len(cameras) or not all(cameras):
            raise ConfigurationError(f"parameter cameras: expected distinct non-empty names, got {cameras}")
        for name in ("camera_topics", "camera_transports"):
            if len(p[name]) != len(cameras):
                raise ConfigurationError(f"parameter {name}: {len(p[name])} entries for {len(cameras)} cameras")
        if bad := [t for t in p["camera_transports"] if t not in ("raw", "compressed")]:
            raise ConfigurationError(f"parameter camera_transports: {bad} (expected raw or compressed)")
        actions = p["navigation_actions"]
        if not actions or len(set(actions)) != len(actions) or not all(a.strip() for a in actions):
            raise ConfigurationError(f"parameter navigation_actions: expected distinct non-empty actions, got {actions}")
        try:
            p["navigation_prompt"].format(instruction="", actions="")
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigurationError(f"parameter navigation_prompt: only {{instruction}} and {{actions}} may be filled in ({error})") from error

    def _load_model(self) -> MobileVLM:
        p = self.params
        self.get_logger().info(f"loading {p['model_path']} (vision {p['vision_backend']}, language {p['language_backend']})")
        return MobileVLM.from_pretrained(
            Path(p["model_path"]),
            device=None if p["device"] == "auto" else p["device"],
            language=p["language_backend"],
            quant=p["quant"],
            vision=p["vision_backend"],
            vision_precision=p["vision_precision"],
            engines_dir=p["engines_dir"] or None,
            llama_amx=AMX_SETTINGS[p["llama_amx"]],
        )

    def _create_interfaces(self) -> None:
        p = self.params
        camera_qos = QoSProfile(
            depth=p["qos_depth"],
            reliability=ReliabilityPolicy.BEST_EFFORT if p["qos_reliability"] == "best_effort" else ReliabilityPolicy.RELIABLE,
            durability=qos_profile_sensor_data.durability,
            history=qos_profile_sensor_data.history,
        )
        for camera, topic, transport in zip(p["cameras"], p["camera_topics"], p["camera_transports"]):
            msg_type, topic = (CompressedImage, f"{topic}/compressed") if transport == "compressed" else (Image, topic)
            subscription = self.create_subscription(msg_type, topic, self._frame_callback(camera), camera_qos)
            self._active_entities.append((self.destroy_subscription, subscription))
        self.answer_publisher = self.create_publisher(Answer, "~/answer", 10)
        self.debug_publisher = self.create_publisher(Image, "~/debug_image", qos_profile_sensor_data)
        self._active_entities += [
            (self.destroy_publisher, self.answer_publisher),
            (self.destroy_publisher, self.debug_publisher),
            (self.destroy_subscription, self.create_subscription(String, "~/query", self._on_query, 10)),
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
        while self.open_requests and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        for _ in range(5):  # let the executor hand the last responses to the middleware
            executor.spin_once(timeout_sec=0.01)

    # ---- requests ---------------------------------------------------------------------------------------------------

    def _frame_callback(self, camera: str) -> Callable[[Image | CompressedImage], None]:
        def store(msg: Image | CompressedImage) -> None:
            self.frames.put(camera, msg, self.get_clock().now().nanoseconds)

        return store

    def _request(self, text: str, camera: str, image: Image | None = None, actions: list[str] | None = None,
                 max_new_tokens: int = 0, mode: str = "", roi: RegionOfInterest | None = None, **kwargs: Any) -> Request:
        """A worker request with its frame resolved now (the latest one at request time); raises MobileVLMError.
        A question is seen as `mode` (empty: crop when `roi` has a size, else the image_mode parameter); the mode and
        region are checked against the frame on the worker."""
        if self.worker is None:
            raise MobileVLMError("node is not active")
        what = "instruction" if actions is not None else "question"
        check_question(text, what)
        if len(text) > self.params["max_question_chars"]:
            raise MobileVLMError(f"{what} is {len(text)} characters; the limit is {self.params['max_question_chars']} (max_question_chars)")
        camera = camera or self.params["cameras"][0]
        now = self.get_clock().now().nanoseconds
        if image is not None and image.data:
            frame = Frame(camera, image, now)  # decoded (and checked) on the worker thread like camera frames
        else:
            frame = self.frames.latest(camera, now, self.get_parameter("max_frame_age_s").value)
        params = SamplingParams(max_new_tokens=max_new_tokens or self.params["max_new_tokens"], temperature=self.get_parameter("temperature").value)
        region = (roi.x_offset, roi.y_offset, roi.width, roi.height) if roi is not None and (roi.width or roi.height) else None
        if actions is None:
            kwargs |= {"mode": mode or ("crop" if region else self.params["image_mode"]), "roi": region, "max_tiles": self.params["max_tiles"]}
        return Request(camera, text, frame, list(actions or []), params, timeout_s=self.get_parameter("request_timeout_s").value, **kwargs)

    def _submit(self, make_request: Callable[[Callable[[Result], None]], Request]) -> tuple[Future, Request | None]:
        """Build and queue a request whose result completes the returned future (from the worker thread)."""
        future = Future(executor=self.executor)

        def done(result: Result) -> None:
            self.stats.record(result.success, result.error, result.latency_s)
            if not result.success:
                self.get_logger().warning(f"request failed: {result.error}")
            future.set_result(result)
            if self.executor is not None:
                self.executor.wake()

        try:
            request = make_request(done)
            self.worker.submit(request)
        except (MobileVLMError, Busy) as error:
            done(Result(False, error=str(error)))
            return future, None
        return future, request

    @tracked
    async def _on_vqa(self, request: VisualQuery.Request, response: VisualQuery.Response) -> VisualQuery.Response:
        future, queued = self._submit(lambda done: self._request(
            request.question, request.camera, request.image, max_new_tokens=request.max_new_tokens, mode=request.mode,
            roi=request.roi, done=done))
        result: Result = await future
        self._fill(response, result, queued, request.camera)
        response.answer = result.answer
        response.prompt_tokens, response.generated_tokens = result.prompt_tokens, result.generated_tokens
        if queued is not None:
            self._publish_debug_image(queued.frame, request.question, result)
        return response

    @tracked
    async def _on_navigate(self, request: NavigationInstruction.Request, response: NavigationInstruction.Response) -> NavigationInstruction.Response:
        actions = list(request.actions) or self.params["navigation_actions"]
        future, queued = self._submit(lambda done: self._request(
            request.instruction, request.camera, request.image, actions=actions, done=done))
        result: Result = await future
        self._fill(response, result, queued, request.camera)
        response.actions = actions
        if result.success:
            response.action, response.confidence = result.action, result.confidence
            response.scores = [result.scores[action] for action in actions]
        if queued is not None:
            self._publish_debug_image(queued.frame, request.instruction, result)
        return response

    def _on_ask_goal(self, goal: Ask.Goal) -> GoalResponse:
        return GoalResponse.ACCEPT if self.worker is not None else GoalResponse.REJECT

    @tracked
    async def _execute_ask(self, goal_handle: Any) -> Ask.Result:
        goal = goal_handle.request

        def feedback(text: str, tokens: int) -> None:
            goal_handle.publish_feedback(Ask.Feedback(partial_answer=text, generated_tokens=tokens))

        future, queued = self._submit(lambda done: self._request(
            goal.question, goal.camera, goal.image, max_new_tokens=goal.max_new_tokens, mode=goal.mode, roi=goal.roi, done=done,
            on_text=feedback, cancelled=lambda: goal_handle.is_cancel_requested))
        result: Result = await future
        response = Ask.Result()
        self._fill(response, result, queued, goal.camera)
        response.answer = result.answer
        response.prompt_tokens, response.generated_tokens = result.prompt_tokens, result.generated_tokens
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return response

    def _on_query(self, msg: String) -> None:
        """`~/query`: answer about the default camera's latest frame on `~/answer` (and draw it on `~/debug_image`)."""

        def publish(result: Result) -> None:
            self.open_requests -= 1
            answer = Answer(camera=request.camera if request else self.params["cameras"][0], question=msg.data,
                            answer=result.answer, success=result.success, error=result.error, latency_s=result.latency_s)
            if request is not None:
                answer.header = request.frame.msg.header
                self._publish_debug_image(request.frame, msg.data, result)
            self.answer_publisher.publish(answer)

        self.open_requests += 1
        future, request = self._submit(lambda done: self._request(msg.data, "", done=done))
        future.add_done_callback(lambda f: publish(f.result()))

    def _fill(self, response: Any, result: Result, request: Request | None, camera: str) -> None:
        """The fields every response shares: success, error, stamp and camera of the frame, latency."""
        response.success, response.error, response.latency_s = result.success, result.error, result.latency_s
        response.camera = request.camera if request else (camera or self.params["cameras"][0])
        if request is not None:
            response.image_stamp = request.frame.stamp

    def _publish_debug_image(self, frame: Frame, question: str, result: Result) -> None:
        """The answered frame with the question and the answer (or the chosen action) drawn, for whoever watches."""
        if not self.params["debug_image"] or self.debug_publisher.get_subscription_count() == 0:
            return
        try:
            rgb = frame.to_rgb()
        except MobileVLMError:
            return
        answer = f"{result.action} ({result.confidence:.2f})" if result.action else result.answer
        text = answer if result.success else f"error: {result.error}"
        self.debug_publisher.publish(rgb_to_image(draw_caption(rgb, [f"Q: {question}", f"A: {text}"]), frame.msg.header))

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
            values |= {"model": self.params["model_path"], "projector": self.vlm.config.mm_projector_type,
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
        max_age_s = self.get_parameter("max_frame_age_s").value
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
    if node.get_parameter("autostart").value and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
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
