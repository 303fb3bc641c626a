"""A small TensorRT runtime wrapper for the vision engine: name-based tensor API, torch buffers, a dedicated stream.

TensorRT 8.6 (JetPack 6.0), 10.x (JetPack 6.1/6.2, x86) and 11.x (x86; JetPack is not supported by 11) all have the
calls used here: `num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `get_tensor_dtype`, `get_tensor_profile_shape`,
`set_input_shape`, `get_tensor_shape`, `set_tensor_address`, `execute_async_v3` (test_tensorrt_gating.py checks that
against the recorded bindings of each release). TensorRT 8.5 (JetPack 5, Python 3.8) cannot run this package at all.
Buffers are torch tensors, so the engine shares torch's CUDA context (no pycuda context of its own). A batch larger
than the engine's profile (more tiles than it was built for) runs in chunks.

What the installed TensorRT is and can build lives in mobilevlm_ros/tensorrt_support.py, shared with the exporter.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mobilevlm_ros.errors import BackendError
from mobilevlm_ros.tensorrt_support import tensorrt_logger, tensorrt_unavailable_reason

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class EngineIO:
    """The vision engine's one input and one output tensor, their dtypes and its profile's largest batch."""

    input_name: str
    output_name: str
    input_dtype: torch.dtype
    output_dtype: torch.dtype
    max_batch: int


def engine_io(trt: ModuleType, engine: Any, source: object = "the engine") -> EngineIO:
    """Read the engine's tensors through the name-based API (BackendError unless one input and one output)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise BackendError(f"{source}: expected one input and one output tensor, found {inputs} -> {outputs}")
    _, _, largest = engine.get_tensor_profile_shape(inputs[0], 0)
    return EngineIO(inputs[0], outputs[0], _torch_dtype(trt, engine.get_tensor_dtype(inputs[0])),
                    _torch_dtype(trt, engine.get_tensor_dtype(outputs[0])), int(largest[0]))


def set_batch_shape(context: Any, io: EngineIO, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Give the context the input shape of this call; returns the output shape it implies."""
    if not context.set_input_shape(io.input_name, shape):
        raise BackendError(f"the vision engine takes {io.input_name} of shape [1..{io.max_batch}, 3, S, S] for its "
                           f"image size S, not {list(shape)}")
    return tuple(context.get_tensor_shape(io.output_name))


def enqueue(context: Any, io: EngineIO, input_address: int, output_address: int, stream_handle: int) -> None:
    """Bind the two buffers and enqueue the engine on the stream."""
    context.set_tensor_address(io.input_name, input_address)
    context.set_tensor_address(io.output_name, output_address)
    if not context.execute_async_v3(stream_handle):
        raise BackendError("TensorRT failed to enqueue the vision engine")


class TensorRTVision:
    name = "tensorrt"

    def __init__(self, engine_path: Path, device: torch.device):
        if reason := tensorrt_unavailable_reason():
            raise BackendError(f"TensorRT cannot run: {reason}")
        import tensorrt as trt

        self.device = device if device.type == "cuda" else torch.device("cuda")
        # The runtime must outlive the engine (the process's one logger outlives both).
        self.runtime = trt.Runtime(tensorrt_logger(trt))
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise BackendError(f"{engine_path}: TensorRT could not deserialize the engine (built by another version or GPU?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        self.io = engine_io(trt, self.engine, engine_path)
        self.max_batch = self.io.max_batch

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            pixels = pixel_values.to(self.device, self.io.input_dtype).contiguous()
            return torch.cat([self._run(chunk) for chunk in pixels.split(self.max_batch)])

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        shape = set_batch_shape(self.context, self.io, tuple(pixels.shape))
        embeds = torch.empty(shape, dtype=self.io.output_dtype, device=self.device)
        # The engine runs on its own stream after the work that produced `pixels`; callers see `embeds` once it is done.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        enqueue(self.context, self.io, pixels.data_ptr(), embeds.data_ptr(), self.stream.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        # Neither buffer may be reused by torch's allocator before the engine's stream is done with it.
        pixels.record_stream(self.stream)
        embeds.record_stream(self.stream)
        return embeds


def _torch_dtype(trt: ModuleType, trt_dtype: object) -> torch.dtype:
    mapping = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8}
    if trt_dtype not in mapping:
        raise BackendError(f"unsupported engine tensor type {trt_dtype}")
    return mapping[trt_dtype]
