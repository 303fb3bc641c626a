"""Vision backends: pixel_values [B, 3, S, S] -> image embeddings [B, num_image_tokens, hidden], all behind one call.

`torch` runs the model's vision path; `onnxruntime` runs the exported graph, fp32 or int8 (CPU, or CUDA when its
provider is there); `tensorrt` (runtime/tensorrt.py) runs an engine built on the target GPU. The same graph feeds the
last two, which replace the torch modules: runtime/backends.py frees those once the backend's artifact exists.
Each backend says where it runs (`device`).
"""

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mobilevlm_ros.errors import BackendError
from mobilevlm_ros.model.mobilevlm import VisionPath


class VisionBackend(Protocol):
    name: str
    device: torch.device

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class TorchVision:
    """The vision path in torch, in the dtype and on the device it was loaded with (pixels are moved there)."""

    name = "torch"

    def __init__(self, vision_path: VisionPath):
        self.vision_path = vision_path

    @property
    def device(self) -> torch.device:
        return self.vision_path.device

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_path(pixel_values.to(self.device, self.vision_path.dtype))


class OnnxRuntimeVision:
    """An ONNX Runtime session over an exported vision graph (tensor names from export/onnx.py).

    It computes with as many threads as torch does (by default both use the physical cores), so the two backends
    compare on equal terms.
    """

    name = "onnxruntime"

    def __init__(self, path: Path, device: torch.device, input_name: str = "pixel_values", output_name: str = "image_embeds"):
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads = torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
            raise BackendError(f"{path}: ONNX Runtime cannot load the vision graph ({error})") from error
        self.path = path
        self.input_name, self.output_name = input_name, output_name
        self.providers = self.session.get_providers()
        self.device = device if self.providers[0] == "CUDAExecutionProvider" else torch.device("cpu")

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(pixel_values.detach().to("cpu", torch.float32).numpy())
        (embeds,) = self.session.run([self.output_name], {self.input_name: pixels})
        return torch.from_numpy(embeds)
