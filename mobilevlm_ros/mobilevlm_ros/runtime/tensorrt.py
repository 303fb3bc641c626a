"""A small TensorRT runtime wrapper for the vision engine: name-based tensor API, torch buffers, a dedicated stream.

It uses only calls present in TensorRT 8.5 (JetPack 5.1), 8.6 and 10.x: `num_io_tensors`, `get_tensor_name`,
`get_tensor_mode`, `get_tensor_dtype`, `get_tensor_profile_shape`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`. Buffers are torch tensors, so the engine shares torch's CUDA context (no pycuda context of its
own). A batch larger than the engine's profile (more tiles than it was built for) runs in chunks.
"""

import logging
from pathlib import Path

import torch

from mobilevlm_ros.errors import BackendError

logger = logging.getLogger(__name__)


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as error:
        return f"the tensorrt Python package is not importable ({error})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


class TensorRTVision:
    name = "tensorrt"

    def __init__(self, engine_path: Path, device: torch.device):
        if reason := tensorrt_unavailable_reason():
            raise BackendError(f"TensorRT cannot run: {reason}")
        import tensorrt as trt

        self.device = device if device.type == "cuda" else torch.device("cuda")
        # The logger and the runtime must outlive the engine.
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.trt_logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise BackendError(f"{engine_path}: TensorRT could not deserialize the engine (built by another version or GPU?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{engine_path}: expected one input and one output tensor, found {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = _torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(self.engine.get_tensor_dtype(self.output_name))
        _, _, largest = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch = largest[0]

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            pixels = pixel_values.to(self.device, self.input_dtype).contiguous()
            return torch.cat([self._run(chunk) for chunk in pixels.split(self.max_batch)])

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.context.set_input_shape(self.input_name, tuple(pixels.shape)):
            raise BackendError(f"the vision engine takes {self.input_name} of shape [1..{self.max_batch}, 3, S, S] for its "
                               f"image size S, not {list(pixels.shape)}")
        embeds = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device=self.device)
        self.context.set_tensor_address(self.input_name, pixels.data_ptr())
        self.context.set_tensor_address(self.output_name, embeds.data_ptr())
        # The engine runs on its own stream after the work that produced `pixels`; callers see `embeds` once it is done.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT failed to enqueue the vision engine")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        # Neither buffer may be reused by torch's allocator before the engine's stream is done with it.
        pixels.record_stream(self.stream)
        embeds.record_stream(self.stream)
        return embeds


def _torch_dtype(trt_dtype: object) -> torch.dtype:
    import tensorrt as trt

    mapping = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8}
    if trt_dtype not in mapping:
        raise BackendError(f"unsupported engine tensor type {trt_dtype}")
    return mapping[trt_dtype]
