"""Every parameter of the node, declared in one table with its description and range.

config/mobilevlm.yaml documents the same names (a test keeps the two identical), and the launch file sets only these.
"""

from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node

from mobilevlm_ros.choices import (
    AMX_SETTINGS, AUTO, DEFAULT_IMAGE_MODES, LANGUAGE_BACKENDS, PRECISIONS, QUANTS, VISION_BACKENDS,
)
from mobilevlm_ros.runtime.navigation import NAVIGATION_ACTIONS, NAVIGATION_PROMPT



@dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    description: str
    int_range: tuple[int, int] | None = None
    float_range: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    dynamic: bool = False  # takes effect at once; the others at the next configure

    def descriptor(self) -> ParameterDescriptor:
        description = self.description + (f" One of: {', '.join(self.choices)}." if self.choices else "")
        description += "" if self.dynamic else " Read at configure."
        descriptor = ParameterDescriptor(description=description)
        if self.int_range:
            descriptor.integer_range = [IntegerRange(from_value=self.int_range[0], to_value=self.int_range[1], step=1)]
        if self.float_range:
            descriptor.floating_point_range = [FloatingPointRange(from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)]
        return descriptor


SPECS = (
    Spec("model_path", "", "MobileVLM checkpoint directory (config.json, weights, tokenizer); empty = the shipped demo model."),
    Spec("vision_backend", "torch", "Vision tower + projector runtime (onnxruntime, tensorrt and ggml build their artifact on "
         "first use; ggml is llama.cpp's own image encoder, mtmd).", choices=VISION_BACKENDS),
    Spec("vision_precision", AUTO, "Precision of the vision backend: auto = TensorRT fp16, onnxruntime fp32, ggml fp16; TensorRT "
         "also fp32 and int8, onnxruntime int8, ggml fp32; torch runs the model's dtype (auto only).", choices=(AUTO, *PRECISIONS)),
    Spec("language_backend", "torch", "Language model runtime.", choices=LANGUAGE_BACKENDS),
    Spec("quant", "q4_k_s", "GGUF quantization for the llamacpp backend.", choices=QUANTS),
    Spec("llama_amx", "auto", "llama.cpp's AMX weight buffers: auto uses them only on CPUs without AMX (its AMX matmul crashes "
         "on some Intel CPUs), on for llama.cpp builds where it works.", choices=tuple(AMX_SETTINGS)),
    Spec("device", "auto", "Where torch runs: auto (CUDA when present), cpu, cuda or cuda:N."),
    Spec("engines_dir", "", "Directory for built artifacts (GGUF, engines); empty = the package's engines/ directory."),
    Spec("max_new_tokens", 64, "Default answer length limit in tokens (a request's max_new_tokens overrides it).", int_range=(1, 2048)),
    Spec("temperature", 0.0, "Sampling temperature; 0 = greedy (deterministic).", float_range=(0.0, 2.0), dynamic=True),
    Spec("image_mode", "overview",
         "How a question sees the frame when its request names no mode: overview (the whole frame at the vision tower's "
         "resolution, as upstream), tiles (overview and tiles in one prompt) or per_tile (each tile asked, the most "
         "confident answer kept). A request's roi means crop; ~/navigate always uses the overview.",
         choices=DEFAULT_IMAGE_MODES),
    Spec("max_tiles", 6, "Tile budget of tiles and per_tile (MiniCPM-V's grid choice over tiles of the vision tower's size); "
         "tiles puts (1 + tiles) x the image tokens in the prompt.", int_range=(1, 32)),
    Spec("max_question_chars", 2000, "Longer questions are refused with an error.", int_range=(1, 1_000_000)),
    Spec("navigation_actions", list(NAVIGATION_ACTIONS), "Actions ~/navigate chooses from when a request names none."),
    Spec("navigation_prompt", NAVIGATION_PROMPT,
         "Question asked for ~/navigate; {instruction} and {actions} (comma-separated) are filled in."),
    Spec("max_queue", 8, "Requests waiting for the worker; beyond it a request fails at once with 'busy: queue full'.", int_range=(1, 1000)),
    Spec("request_timeout_s", 30.0, "A request not answered within this time fails with a timeout error.", float_range=(0.1, 3600.0), dynamic=True),
    Spec("max_frame_age_s", 2.0, "Frames older than this are refused as stale; 0 = no limit.", float_range=(0.0, 3600.0), dynamic=True),
    Spec("cameras", ["camera"], "Camera names; the first is the default camera of requests that name none."),
    Spec("camera_topics", ["image"], "Image topic of each camera (same order as cameras); remap them in the launch file."),
    Spec("camera_transports", ["raw"], "Per camera: raw (sensor_msgs/Image on the topic) or compressed (CompressedImage on <topic>/compressed)."),
    Spec("qos_reliability", "best_effort", "Camera subscription reliability (best_effort = SENSOR_DATA).", choices=("best_effort", "reliable")),
    Spec("qos_depth", 5, "Camera subscription queue depth.", int_range=(1, 100)),
    Spec("debug_image", True, "Publish ~/debug_image (frame with question and answer drawn) when someone subscribes."),
    Spec("diagnostics_period_s", 1.0, "Period of the /diagnostics status.", float_range=(0.1, 60.0)),
    Spec("autostart", True, "Configure and activate at start-up, so a plain launch just works."),
)


def declare_parameters(node: Node) -> None:
    for spec in SPECS:
        node.declare_parameter(spec.name, spec.default, spec.descriptor())


def parameter_values(node: Node) -> dict[str, Any]:
    return {spec.name: node.get_parameter(spec.name).value for spec in SPECS}
