"""Every parameter of the node: declared from one table, checked by one set of rules, read as one typed object.

`SPECS` holds each parameter's description, range, choices, its own checks and when it is read; `Parameters` is the
node's typed view of the values. The node reads only `Parameters`: at configure (after `check_parameters`, which adds
the rules between parameters) and, for the parameters that change at once, from its set-parameters callback
(`changed`), which refuses a bad value, or a configure-time parameter while the node is configured, with a reason.
config/mobilevlm.yaml documents the same names (a test keeps the two identical), and the launch file sets only these.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node

from mobilevlm_ros.choices import (
    AMX_SETTINGS,
    AUTO,
    DEFAULT_IMAGE_MODES,
    ENGINE_BUILD,
    LANGUAGE_BACKENDS,
    PRECISIONS,
    QUANTS,
    VISION_BACKENDS,
)
from mobilevlm_ros.demo import DEMO_CHECKPOINT
from mobilevlm_ros.errors import MobileVLMError
from mobilevlm_ros.runtime.navigation import NAVIGATION_ACTIONS, NAVIGATION_PROMPT

CAMERA_TRANSPORTS = ("raw", "compressed")
CAMERA_QOS_CHECK_S = 2.0  # with qos_reliability auto: how often the camera publishers' reliability is read again


class ConfigurationError(MobileVLMError):
    """A parameter value, or parameters that cannot work together."""


class Read(Enum):
    """When the node reads a parameter, which decides when it may change."""

    AT_START = "at start-up"  # read once when the node starts: read-only afterwards
    AT_CONFIGURE = "at configure"  # refused while the node is configured: it would be ignored until the next configure
    AT_ONCE = "at once"  # the next request uses it


def _distinct_names(names: list[str]) -> str:
    return "" if names and len(set(names)) == len(names) and all(names) else f"expected distinct non-empty names, got {names}"


def _distinct_actions(actions: list[str]) -> str:
    if actions and len(set(actions)) == len(actions) and all(action.strip() for action in actions):
        return ""
    return f"expected distinct non-empty actions, got {actions}"


def _transports(transports: list[str]) -> str:
    bad = [transport for transport in transports if transport not in CAMERA_TRANSPORTS]
    return f"{bad} (expected raw or compressed)" if bad else ""


def _navigation_prompt(template: str) -> str:
    try:
        template.format(instruction="", actions="")
    except (KeyError, IndexError, ValueError) as error:
        return f"only {{instruction}} and {{actions}} may be filled in ({error})"
    return ""


@dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    description: str
    int_range: tuple[int, int] | None = None
    float_range: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str] | None = None  # what is wrong with a value ("" when nothing), beyond type and range
    read: Read = Read.AT_CONFIGURE

    def descriptor(self) -> ParameterDescriptor:
        description = self.description + (f" One of: {', '.join(self.choices)}." if self.choices else "")
        description += "" if self.read is Read.AT_ONCE else f" Read {self.read.value}."
        descriptor = ParameterDescriptor(description=description, read_only=self.read is Read.AT_START)
        if self.int_range:
            descriptor.integer_range = [IntegerRange(from_value=self.int_range[0], to_value=self.int_range[1], step=1)]
        if self.float_range:
            descriptor.floating_point_range = [FloatingPointRange(from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)]
        return descriptor

    def problem(self, value: Any) -> str:
        """What is wrong with `value` for this parameter ("" when nothing); rclpy has checked its type and range."""
        if self.choices and value not in self.choices:
            return f"{value!r} is not one of {', '.join(self.choices)}"
        return self.check(value) if self.check else ""


SPECS = (
    Spec("model_path", "", "MobileVLM checkpoint directory (config.json, weights, tokenizer); empty = the shipped demo model."),
    Spec("vision_backend", "torch", "Vision tower + projector runtime (onnxruntime, tensorrt and ggml run an artifact: see "
         "engine_build; ggml is llama.cpp's own image encoder, mtmd).", choices=VISION_BACKENDS),
    Spec("vision_precision", AUTO, "Precision of the vision backend: auto = TensorRT fp16, onnxruntime fp32, ggml fp16; TensorRT "
         "also fp32 and int8, onnxruntime int8, ggml fp32; torch runs the model's dtype (auto only).", choices=(AUTO, *PRECISIONS)),
    Spec("language_backend", "torch", "Language model runtime.", choices=LANGUAGE_BACKENDS),
    Spec("quant", "q4_k_s", "GGUF quantization for the llamacpp backend.", choices=QUANTS),
    Spec("llama_amx", "auto", "llama.cpp's AMX weight buffers: auto uses them only on CPUs without AMX (its AMX matmul crashes "
         "on some Intel CPUs), on for llama.cpp builds where it works.", choices=tuple(AMX_SETTINGS)),
    Spec("device", "auto", "Where torch runs: auto (CUDA when present), cpu, cuda or cuda:N."),
    Spec("engines_dir", "", "Directory for built artifacts (GGUF, engines); empty = the package's engines/ directory."),
    Spec("engine_build", "never", "When configure builds the artifacts the backends run (GGUF, ONNX graph, TensorRT engine, "
         "mmproj): never = a missing or stale one fails configure with an error naming its `mobilevlm build` command (build "
         "them ahead: a TensorRT build takes minutes and memory beside the loaded LLM); if_missing = build it then; always "
         "= rebuild.", choices=ENGINE_BUILD),
    Spec("engine_path", "", "The vision backend's artifact at this file (built ahead with `mobilevlm build --engine-path`, "
         "its manifest beside it); empty = its name in engines_dir."),
    Spec("max_new_tokens", 64, "Default answer length limit in tokens (a request's max_new_tokens overrides it).", int_range=(1, 2048)),
    Spec("temperature", 0.0, "Sampling temperature; 0 = greedy (deterministic).", float_range=(0.0, 2.0), read=Read.AT_ONCE),
    Spec("image_mode", "overview",
         "How a question sees the frame when its request names no mode: overview (the whole frame at the vision tower's "
         "resolution, as upstream), tiles (overview and tiles in one prompt) or per_tile (each tile asked, the most "
         "confident answer kept). A request's roi means crop; ~/navigate always uses the overview.",
         choices=DEFAULT_IMAGE_MODES),
    Spec("max_tiles", 6, "Tile budget of tiles and per_tile (MiniCPM-V's grid choice over tiles of the vision tower's size); "
         "tiles puts (1 + tiles) x the image tokens in the prompt.", int_range=(1, 32)),
    Spec("max_question_chars", 2000, "Longer questions are refused with an error.", int_range=(1, 1_000_000)),
    Spec("navigation_actions", list(NAVIGATION_ACTIONS), "Actions ~/navigate chooses from when a request names none.",
         check=_distinct_actions),
    Spec("navigation_prompt", NAVIGATION_PROMPT,
         "Question asked for ~/navigate; {instruction} and {actions} (comma-separated) are filled in.", check=_navigation_prompt),
    Spec("max_queue", 8, "Requests waiting for the worker; beyond it a request fails at once with 'busy: queue full'.",
         int_range=(1, 1000)),
    Spec("request_timeout_s", 30.0, "A request not answered within this time fails with a timeout error.", float_range=(0.1, 3600.0),
         read=Read.AT_ONCE),
    Spec("max_frame_age_s", 2.0, "Frames older than this are refused as stale; 0 = no limit.", float_range=(0.0, 3600.0),
         read=Read.AT_ONCE),
    Spec("cameras", ["camera"], "Camera names; the first is the default camera of requests that name none.", check=_distinct_names),
    Spec("camera_topics", ["image"], "Image topic of each camera (same order as cameras); remap them in the launch file."),
    Spec("camera_transports", ["raw"],
         "Per camera: raw (sensor_msgs/Image on the topic) or compressed (CompressedImage on <topic>/compressed).", check=_transports),
    Spec("qos_reliability", "auto", "Camera subscription reliability: auto matches the camera's publishers (reliable "
         f"when all of them are, best effort otherwise, checked again every {CAMERA_QOS_CHECK_S:g} s); best_effort is "
         "SENSOR_DATA.", choices=("auto", "best_effort", "reliable")),
    Spec("qos_depth", 1, "Camera subscription queue depth (the node keeps only each camera's latest frame).",
         int_range=(1, 100)),
    Spec("debug_image", True, "Publish ~/debug_image and ~/debug_image/compressed (the frame with question and answer "
         "drawn) while someone subscribes."),
    Spec("diagnostics_period_s", 1.0, "Period of the /diagnostics status.", float_range=(0.1, 60.0), read=Read.AT_START),
    Spec("autostart", True, "Configure and activate at start-up, so a plain launch just works.", read=Read.AT_START),
)
_SPEC = {spec.name: spec for spec in SPECS}


@dataclass(frozen=True)
class Parameters:
    """The values of `SPECS`, typed (the field names are the parameter names)."""

    model_path: str
    vision_backend: str
    vision_precision: str
    language_backend: str
    quant: str
    llama_amx: str
    device: str
    engines_dir: str
    engine_build: str
    engine_path: str
    max_new_tokens: int
    temperature: float
    image_mode: str
    max_tiles: int
    max_question_chars: int
    navigation_actions: list[str]
    navigation_prompt: str
    max_queue: int
    request_timeout_s: float
    max_frame_age_s: float
    cameras: list[str]
    camera_topics: list[str]
    camera_transports: list[str]
    qos_reliability: str
    qos_depth: int
    debug_image: bool
    diagnostics_period_s: float
    autostart: bool

    @property
    def model_dir(self) -> Path:
        """The checkpoint directory: model_path, or the shipped demo model when it is empty."""
        return Path(self.model_path) if self.model_path else DEMO_CHECKPOINT

    @property
    def default_camera(self) -> str:
        return self.cameras[0]


def declare_parameters(node: Node) -> Parameters:
    """Declare every parameter on `node` (overrides from the command line or a launch file apply) and read them."""
    for spec in SPECS:
        node.declare_parameter(spec.name, spec.default, spec.descriptor())
    return Parameters(**{spec.name: node.get_parameter(spec.name).value for spec in SPECS})


def check_parameters(params: Parameters) -> None:
    """Raise ConfigurationError for the first bad value or combination (at configure: overrides given at start-up
    have not been through `changed`)."""
    for spec in SPECS:
        if problem := spec.problem(getattr(params, spec.name)):
            raise ConfigurationError(f"parameter {spec.name}: {problem}")
    for name in ("camera_topics", "camera_transports"):
        if len(getattr(params, name)) != len(params.cameras):
            raise ConfigurationError(f"parameter {name}: {len(getattr(params, name))} entries for {len(params.cameras)} cameras")


def changed(params: Parameters, values: dict[str, Any], configured: bool) -> Parameters:
    """`params` with `values` set at run time, or a ConfigurationError saying why not. Each value is checked on its own
    (rclpy has checked type and range); the rules between parameters wait for configure, so cameras and their topics
    can be set one after the other."""
    for name, value in values.items():
        spec = _SPEC[name]
        if spec.read is Read.AT_CONFIGURE and configured and value != getattr(params, name):
            raise ConfigurationError(f"parameter {name} is read at configure: set it while the node is unconfigured")
        if problem := spec.problem(value):
            raise ConfigurationError(f"parameter {name}: {problem}")
    return replace(params, **values)
