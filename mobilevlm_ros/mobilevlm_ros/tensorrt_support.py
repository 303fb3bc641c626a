"""What the installed TensorRT is and can do: its version, the process's one logger, the precisions it builds, and
why it cannot run here when it cannot.

Shared by the engine builder (export/tensorrt.py) and the engine runtime (runtime/tensorrt.py), which must not import
each other (export does not import runtime), and by `mobilevlm doctor`. 8.6 and 10.x build fp16 and int8 from builder
flags (weak typing); 11 removed those flags and the int8 calibrators (networks are strongly typed), so fp16 comes from
an fp16 ONNX graph and int8 would need Q/DQ nodes. TensorRT 8.5 (JetPack 5, Python 3.8) cannot run this package.
"""

import re
import threading
from types import ModuleType
from typing import Any

import torch

from mobilevlm_ros.errors import BackendError

MIN_TENSORRT = (8, 6)
_logger_lock = threading.Lock()
_trt_logger: Any = None


def tensorrt_version(trt: ModuleType) -> tuple[int, int]:
    """(major, minor) of the imported bindings, from `tensorrt.__version__` (package metadata names the wrong
    distribution for tensorrt-cu12 wheels and JetPack's apt bindings)."""
    match = re.match(r"(\d+)\.(\d+)", str(trt.__version__))
    if match is None:
        raise BackendError(f"cannot read the TensorRT version from tensorrt.__version__ = {trt.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def tensorrt_logger(trt: ModuleType) -> Any:
    """The process's one `trt.Logger` (TensorRT warns when a second one is made); it outlives every engine."""
    global _trt_logger
    with _logger_lock:
        if _trt_logger is None:
            _trt_logger = trt.Logger(trt.Logger.WARNING)
        return _trt_logger


def strongly_typed_only(trt: ModuleType) -> bool:
    """True for TensorRT 11 and later: no precision builder flags; every tensor's type comes from the network."""
    return not hasattr(trt.BuilderFlag, "FP16")


def precision_support(trt: ModuleType) -> dict[str, str | None]:
    """For fp16, fp32 and int8: None when this TensorRT builds it, else why not."""
    int8 = None
    if strongly_typed_only(trt):
        int8 = (f"TensorRT {trt.__version__} builds int8 only from explicitly quantized (Q/DQ) graphs, which this "
                "package does not make; use fp16, or int8 on TensorRT 8.6 / 10.x (JetPack 6)")
    elif not hasattr(trt, "IInt8EntropyCalibrator2"):
        int8 = f"TensorRT {trt.__version__} has no int8 entropy calibrator"
    return {"fp16": None, "fp32": None, "int8": int8}


def describe_precisions(trt: ModuleType) -> str:
    """One line for `mobilevlm doctor`: what this TensorRT builds and how."""
    support = precision_support(trt)
    fp16 = "fp16 (from an fp16 ONNX graph, LayerNorm fp32)" if strongly_typed_only(trt) else "fp16 (builder flag)"
    builds = [fp16, "fp32 (TF32 off)"] + (["int8 (entropy calibration)"] if support["int8"] is None else [])
    refused = f"; not int8: {support['int8']}" if support["int8"] else ""
    return f"builds {', '.join(builds)}{refused}"


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    try:
        import tensorrt as trt
    except ImportError as error:
        return f"the tensorrt Python package is not importable ({error})"
    try:
        version = tensorrt_version(trt)
    except BackendError as error:
        return str(error)
    if version < MIN_TENSORRT:
        return (f"TensorRT {trt.__version__} is too old: this package needs TensorRT 8.6 or later "
                "(JetPack 6 or later on a Jetson)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None
