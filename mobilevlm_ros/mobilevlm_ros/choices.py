"""The choices a user makes: backends, the precisions each vision backend runs, GGUF types, image modes.

One table, read by `MobileVLM.from_pretrained`, the `mobilevlm` command line and the node's parameters, so a name is
spelled once and a combination is refused the same way everywhere. Import-light on purpose: `mobilevlm --help` and
the node's parameter declarations read it without loading torch or any backend.
"""

from mobilevlm_ros.errors import ConfigError

VISION_BACKENDS = ("torch", "onnxruntime", "tensorrt", "ggml")
LANGUAGE_BACKENDS = ("torch", "llamacpp")

# What each vision backend can run, its default first. torch runs in the model's dtype (`dtype`), so "auto" only;
# ONNX Runtime on a CPU has no fast fp16 kernels, so its graphs are fp32 or int8; TensorRT builds all three; ggml
# (llama.cpp's mtmd) runs an f16 or f32 mmproj GGUF.
AUTO = "auto"
VISION_PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": (),
    "onnxruntime": ("fp32", "int8"),
    "tensorrt": ("fp16", "fp32", "int8"),
    "ggml": ("fp16", "fp32"),
}
PRECISIONS = ("fp16", "fp32", "int8")

# GGUF file types of the llama.cpp language backend: Q4_K_S is the MobileVLM paper's deployment.
QUANTS = ("q4_k_s", "q4_k_m", "q8_0", "f16", "f32")
# GGUF file types of the mmproj (vision tower + projector for llama.cpp's mtmd), and the one each ggml precision runs.
MMPROJ_TYPES = ("f16", "f32")
GGML_MMPROJ_TYPES = {"fp16": "f16", "fp32": "f32"}

# How a frame is shown to the model: the whole frame at the tower's resolution (upstream); that overview and the
# tiles of the frame in one prompt; each tile asked on its own; a region of interest at full resolution.
IMAGE_MODES = ("overview", "tiles", "per_tile", "crop")
# The modes a request may get by default: crop needs a region, which only a request carries.
DEFAULT_IMAGE_MODES = tuple(mode for mode in IMAGE_MODES if mode != "crop")

# Whether llama.cpp may use its AMX buffer type (auto: decided by the CPU's features, see ggml.py).
AMX_SETTINGS = {"auto": None, "on": True, "off": False}

# When the artifacts a backend runs (TensorRT engine, ONNX graph, mmproj, LLM GGUF) are built, as Isaac ROS's
# `force_engine_update` and NanoLLM's build-ahead: never (a missing or stale artifact is an ArtifactError naming the
# `mobilevlm build` command that makes it; what a robot wants at start-up, where a build means minutes and, on an 8 GB
# Orin Nano, memory the loaded LLM needs), if_missing (build a missing or stale one: the library's default) or always
# (rebuild the backends' own artifacts at every load; intermediate ones, e.g. the ONNX graph an engine is built from,
# are reused while they are valid). True and False, the library's older spelling, mean if_missing and never.
ENGINE_BUILD = ("never", "if_missing", "always")


def engine_build_policy(build: "bool | str") -> str:
    """`build` as one of ENGINE_BUILD (a bool: True is if_missing, False is never)."""
    if isinstance(build, bool):
        return "if_missing" if build else "never"
    return check_choice("engine build policy", build, ENGINE_BUILD)


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value` when it is one of `allowed`, else a ConfigError naming `what` and the choices."""
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r} (expected {', '.join(allowed)})")
    return value


def vision_precision(backend: str, precision: str = AUTO) -> str | None:
    """The precision `backend` runs for `precision` ("auto": its default; None for torch, which runs the model's dtype).
    A precision the backend cannot run is a ConfigError that says which it can."""
    check_choice("vision backend", backend, VISION_BACKENDS)
    allowed = VISION_PRECISIONS[backend]
    if precision == AUTO:
        return allowed[0] if allowed else None
    if precision not in allowed:
        runs = f"runs {' or '.join(allowed)}" if allowed else "runs in the model's dtype (leave the precision auto)"
        raise ConfigError(f"vision backend {backend} {runs}, not {precision!r}")
    return precision
