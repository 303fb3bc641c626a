"""ONNX export of the vision path: pixels -> image embeddings, as one graph or as ViT and projector graphs.

The tower is cut at the selected layer (the layers past it are not in the graph), the CLS token is dropped and the
projector is folded in, so an engine built from the graph does exactly what `MobileLlamaForCausalLM.encode_images`
does. Opset 17 keeps LayerNorm as one LayerNormalization op (TensorRT >= 8.6 runs it safely in fp16). The batch
dimension is dynamic: tiles of one high-resolution frame go through in one call.
"""

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import onnx
import torch
from torch import nn

from mobilevlm_ros.export.artifacts import Artifact, ArtifactKey, get_or_build, model_fingerprint
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM

logger = logging.getLogger(__name__)

OPSET = 17
PROTOBUF_LIMIT = 2**31 - 1  # bytes; a larger model keeps its weights in an external data file
Part = Literal["vision", "vit", "projector"]

# Tensor names of each graph: (inputs, outputs). Engines and sessions address tensors by these names.
TENSOR_NAMES: dict[str, tuple[str, str]] = {
    "vision": ("pixel_values", "image_embeds"),
    "vit": ("pixel_values", "image_features"),
    "projector": ("image_features", "image_embeds"),
}


class VisionGraph(nn.Module):
    """The part of a MobileVLM an ONNX graph holds."""

    def __init__(self, model: MobileLlamaForCausalLM, part: Part):
        super().__init__()
        self.part = part
        self.vision_tower = model.model.vision_tower if part in ("vision", "vit") else None
        self.mm_projector = model.model.mm_projector if part in ("vision", "projector") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vision_tower is not None:
            x = self.vision_tower(x)
        if self.mm_projector is not None:
            x = self.mm_projector(x)
        return x


def example_input(model: MobileLlamaForCausalLM, part: Part, batch: int = 1) -> torch.Tensor:
    """A tensor of the graph's input shape, in the model's dtype and device."""
    tower = model.model.vision_tower
    parameter = next(model.model.mm_projector.parameters())
    if part == "projector":
        tokens = tower.num_patches + (tower.select_feature == "cls_patch")
        return torch.randn(batch, tokens, tower.config.hidden_size, dtype=parameter.dtype, device=parameter.device)
    size = tower.config.image_size
    return torch.randn(batch, 3, size, size, dtype=parameter.dtype, device=parameter.device)


def export_onnx(
    model: MobileLlamaForCausalLM, path: Path, part: Part = "vision", external_data_name: str | None = None, opset: int = OPSET
) -> dict[str, object]:
    """Write `part` of `model` to `path`, as one file unless the graph passes protobuf's 2 GB limit; then its weights
    go to one external data file beside it, `external_data_name` (default `<file>.data`).

    `opset` below 17 decomposes LayerNorm into primitive ops (TensorRT 8.5 cannot parse LayerNormalization).
    Returns what the artifact manifest records: tensor names, opset, and the external data file if any.
    """
    graph = VisionGraph(model, part).eval()
    input_name, output_name = TENSOR_NAMES[part]
    tower = model.model.vision_tower
    attention = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"  # plain MatMul/Softmax: every exporter and TensorRT version takes it
    try:
        with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about the shape checks in our forward passes; shapes are fixed but the batch, as intended.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            raw = Path(scratch) / "graph.onnx"  # the exporter may scatter weights of a large graph next to it
            torch.onnx.export(
                graph, (example_input(model, part),), str(raw), input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset, dynamo=False,
            )
            proto = onnx.load(str(raw))
    finally:
        tower.config._attn_implementation = attention
    details: dict[str, object] = {"part": part, "input": input_name, "output": output_name, "opset": opset}
    if proto.ByteSize() > PROTOBUF_LIMIT:
        name = external_data_name or path.name + ".data"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=name)
        details["external_data"] = name
    else:
        onnx.save_model(proto, str(path))
    logger.info("exported the %s graph to %s (%.1f MB)", part, path, path.stat().st_size / 1e6)
    return details


def onnx_artifact(model: MobileLlamaForCausalLM, model_dir: Path, engines_dir: Path | None, build: bool, opset: int = OPSET) -> Artifact:
    """The vision graph of the checkpoint in `model_dir` from the artifact cache, exported when missing or stale."""
    key = ArtifactKey(
        model_hash=model_fingerprint(model_dir),
        component="vision",
        precision=f"onnx-opset{opset}",
        runtime="onnx",
        runtime_version=f"torch {torch.__version__}, onnx {onnx.__version__}",
        device="any",
        suffix="onnx",
        extra={"tensors": list(TENSOR_NAMES["vision"])},
    )
    return get_or_build(key, lambda path: export_onnx(model, path, "vision", key.filename + ".data", opset), engines_dir, build)
