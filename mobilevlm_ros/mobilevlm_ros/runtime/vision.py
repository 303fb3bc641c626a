"""Vision backends: pixel_values [B, 3, S, S] -> image embeddings [B, num_image_tokens, hidden], all behind one call.

`torch` runs the loaded modules; `onnxruntime` runs the exported graph, fp32 or int8 (CPU, or CUDA when its provider
is there); `tensorrt` (runtime/tensorrt.py) runs an engine built on the target GPU. The same graph feeds the last two,
which replace the torch modules: MobileVLM drops those once the backend's artifact exists.
"""

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mobilevlm_ros.errors import BackendError
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM


class VisionBackend(Protocol):
    name: str

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class TorchVision:
    name = "torch"

    def __init__(self, model: MobileLlamaForCausalLM):
        self.model = model

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        parameter = next(self.model.model.mm_projector.parameters())
        return self.model.encode_images(pixel_values.to(parameter.device, parameter.dtype))


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

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(pixel_values.detach().to("cpu", torch.float32).numpy())
        (embeds,) = self.session.run([self.output_name], {self.input_name: pixels})
        return torch.from_numpy(embeds)
