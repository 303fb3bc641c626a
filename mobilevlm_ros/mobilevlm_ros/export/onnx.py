"""ONNX export of the vision path: pixels -> image embeddings, as one graph or as ViT and projector graphs.

The tower is cut at the selected layer (the layers past it are not in the graph), the CLS token is dropped and the
projector is folded in, so an engine built from the graph does exactly what the model's `VisionPath` does. Opset 17
keeps LayerNorm as one LayerNormalization op (TensorRT >= 8.6 runs it safely in fp16). The batch dimension is
dynamic: tiles of one high-resolution frame go through in one call. The graph is always fp32 (whatever dtype the
torch model was loaded in): it is the portable source TensorRT builds every precision from.

`int8` is a second graph for ONNX Runtime on CPU: the fp32 graph with dynamically quantized MatMuls (int8 weights per
output channel, activations quantized per call). An fp32 ViT-L runs near this CPU's fp32 FLOP peak in torch and ONNX
Runtime alike; int8 GEMMs are what make it faster (see README, Backends).
"""

import copy
import inspect
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import onnx
import torch

from mobilevlm_ros.errors import ArtifactError
from mobilevlm_ros.export.artifacts import Artifact, ArtifactKey, build_command, get_or_build, model_fingerprint
from mobilevlm_ros.model.checkpoint import load_vision_path
from mobilevlm_ros.model.mobilevlm import VisionPath

logger = logging.getLogger(__name__)

OPSET = 17
PROTOBUF_LIMIT = 2**31 - 1  # bytes; a larger model keeps its weights in an external data file
Part = Literal["vision", "vit", "projector"]
OnnxPrecision = Literal["fp32", "int8"]
# How the int8 graph quantizes: int8 weights per output channel in a 7-bit range (x86 without VNNI multiplies u8 x s8
# pairs into int16 with saturation; 7-bit weights cannot saturate), MatMuls only (the patch Conv is 0.3% of the time).
QUANTIZATION = {"weights": "int8 per channel, reduced range", "activations": "uint8 dynamic", "ops": ["MatMul"]}

# Tensor names of each graph: (inputs, outputs). Engines and sessions address tensors by these names.
TENSOR_NAMES: dict[str, tuple[str, str]] = {
    "vision": ("pixel_values", "image_embeds"),
    "vit": ("pixel_values", "image_features"),
    "projector": ("image_features", "image_embeds"),
}


def export_onnx(
    vision: VisionPath, path: Path, part: Part = "vision", external_data_name: str | None = None, opset: int = OPSET
) -> dict[str, object]:
    """Write `part` of the vision path to `path` ("vit": the tower alone, "projector": the projector alone), as one
    file unless the graph passes protobuf's 2 GB limit; then its weights go to one external data file beside it,
    `external_data_name` (default `<file>.data`).

    `opset` below 17 decomposes LayerNorm into primitive ops (for runtimes without LayerNormalization).
    Returns what the artifact manifest records: tensor names, opset, and the external data file if any.
    """
    input_name, output_name = TENSOR_NAMES[part]
    config = vision.vision_tower.config
    attention = config._attn_implementation
    config._attn_implementation = "eager"  # plain MatMul/Softmax: every exporter and TensorRT version takes it
    try:
        if vision.dtype != torch.float32 or vision.device.type != "cpu":
            vision = copy.deepcopy(vision).to("cpu", torch.float32)  # the serving model keeps its dtype and device
        vision.eval()
        with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about the shape checks in our forward passes; shapes are fixed but the batch, as intended.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            graph = {"vision": vision, "vit": vision.vision_tower, "projector": vision.mm_projector}[part]
            example = vision.example_input()
            if part == "projector":
                example = vision.vision_tower(example)  # the tower's features are the projector's input
            raw = Path(scratch) / "graph.onnx"  # the exporter may scatter weights of a large graph next to it
            torch.onnx.export(
                graph, (example,), str(raw), input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset, **torchscript_exporter(),
            )
            proto = onnx.load(str(raw))
    finally:
        config._attn_implementation = attention
    details: dict[str, object] = {"part": part, "input": input_name, "output": output_name, "opset": opset}
    details |= save_graph(proto, path, external_data_name)
    logger.info("exported the %s graph to %s (%.1f MB)", part, path, path.stat().st_size / 1e6)
    return details


def save_graph(proto: onnx.ModelProto, path: Path, external_data_name: str | None = None) -> dict[str, object]:
    """Write `proto` to `path`; past protobuf's 2 GB limit its weights go to one file beside it (`external_data_name`,
    by default `<path name>.data`), named in the returned details."""
    if proto.ByteSize() <= PROTOBUF_LIMIT:
        onnx.save_model(proto, str(path))
        return {}
    name = external_data_name or path.name + ".data"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=name)
    return {"external_data": name}


def torchscript_exporter(export: object = None) -> dict[str, bool]:
    """The keyword that picks the TorchScript exporter: `dynamo=False` where `torch.onnx.export` has that parameter
    (torch 2.4 on; 2.9 made the dynamo exporter the default), nothing on older torch, which has only that exporter."""
    parameters = inspect.signature(export or torch.onnx.export).parameters
    return {"dynamo": False} if "dynamo" in parameters else {}


def quantize_onnx(source: Path, path: Path) -> dict[str, object]:
    """Write the int8 version of the fp32 graph `source` to `path` (see QUANTIZATION)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, path, op_types_to_quantize=QUANTIZATION["ops"], per_channel=True, reduce_range=True,
                     weight_type=QuantType.QInt8)
    logger.info("quantized %s to int8 in %s (%.1f MB)", source.name, path, path.stat().st_size / 1e6)
    return {"source": source.name, "quantization": QUANTIZATION}


def onnx_artifact(
    vision: VisionPath | None, model_dir: Path, engines_dir: Path | None, build: bool | str, opset: int = OPSET,
    precision: OnnxPrecision = "fp32", path: Path | None = None,
) -> Artifact:
    """The vision graph of the checkpoint in `model_dir` from the artifact cache (or at `path`), exported when missing
    or stale and `build` (the policy, see get_or_build) allows; `precision="int8"` is the quantized graph, made from
    the (cached) fp32 one. `vision` is the loaded vision path to export; None reads it from `model_dir` when needed."""
    versions = f"torch {torch.__version__}, onnx {onnx.__version__}"
    command = build_command(model_dir, ["--vision", "onnx", "--precision", precision], engines_dir, path)
    if precision == "int8":
        import onnxruntime

        key = ArtifactKey(
            model_hash=model_fingerprint(model_dir), component="vision", precision=f"onnx-int8-opset{opset}",
            runtime="onnxruntime.quantization", runtime_version=f"{versions}, onnxruntime {onnxruntime.__version__}",
            device="any", suffix="onnx", extra={"tensors": list(TENSOR_NAMES["vision"]), "quantization": QUANTIZATION},
        )
        return get_or_build(
            key, lambda target: quantize_onnx(onnx_artifact(vision, model_dir, engines_dir, "if_missing", opset).path, target),
            engines_dir, build, path, command,
        )
    if precision != "fp32":
        raise ArtifactError(f"unknown ONNX graph precision {precision!r} (expected fp32 or int8)")
    key = ArtifactKey(
        model_hash=model_fingerprint(model_dir),
        component="vision",
        precision=f"onnx-opset{opset}",
        runtime="onnx",
        runtime_version=versions,
        device="any",
        suffix="onnx",
        extra={"tensors": list(TENSOR_NAMES["vision"])},
    )

    data_name = (Path(path).name if path is not None else key.filename) + ".data"  # beside the graph, if it needs one

    def export(target: Path) -> dict[str, object]:
        return export_onnx(vision if vision is not None else load_vision_path(model_dir), target, "vision", data_name, opset)

    return get_or_build(key, export, engines_dir, build, path, command)
