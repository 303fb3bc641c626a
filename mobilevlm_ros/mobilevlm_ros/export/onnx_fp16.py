"""The fp16 vision graph: what TensorRT 11 builds an fp16 engine from.

TensorRT 11 removed the builder's FP16 flag: networks are strongly typed, every tensor has the type the graph gives it
(NVIDIA's 10.x -> 11.x migration guide: convert the ONNX model to mixed precision first, e.g. with ModelOpt's AutoCast).
This pass writes that graph from the cached fp32 one, for the op set our vision graphs hold, with `onnx` alone
(nvidia-modelopt 0.47 would pull torch >= 2.8, onnx ~= 1.21 and onnxruntime-gpu ~= 1.24 into the build):

- every float tensor becomes fp16: initializers (clipped to fp16's range, counted), Constant and ConstantOfShape values,
  Cast-to-float nodes;
- LayerNormalization stays fp32: its input is cast up, its output cast back down, its scale and bias stay fp32. In
  fp16 the variance of CLIP ViT-L's residual stream overflows; TensorRT 8.6 / 10.x compute a normalization layer in
  fp32 whatever the builder flags say, a strongly typed network computes it in its input's type;
- the graph's inputs and outputs stay fp32 (a Cast after each input, before each output), so an engine takes and gives
  the same dtypes whatever its precision.

A node the pass does not know how to type (a subgraph, a dtype attribute other than Cast's) is an ArtifactError: an
fp16 graph that type-checks is the pass's contract, checked with ONNX's strict type inference on the result.
"""

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, ModelProto, TensorProto, helper, numpy_helper

from mobilevlm_ros.choices import engine_build_policy
from mobilevlm_ros.errors import ArtifactError
from mobilevlm_ros.export.artifacts import Artifact, ArtifactKey, build_command, get_or_build, model_fingerprint
from mobilevlm_ros.export.onnx import OPSET, TENSOR_NAMES, onnx_artifact, save_graph
from mobilevlm_ros.model.mobilevlm import VisionPath

logger = logging.getLogger(__name__)

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
KEEP_FP32_OPS = ("LayerNormalization",)
FP16_MAX = float(np.finfo(np.float16).max)
FP16_PASS_VERSION = 1  # bump when the written graph changes: it is part of the artifact key
# Ops whose output type an attribute names: Cast is converted; these would silently stay fp32 (or need care): refused.
_TYPED_ATTRIBUTES = ("to", "dtype", "output_dtype")


def _elem_types(model: ModelProto) -> dict[str, int]:
    """Element type of every tensor of the graph, from ONNX's strict type inference on the graph without its weights
    (initializers become typed inputs: types do not depend on values, and a 1 GB graph is not copied)."""
    graph = model.graph
    declared = {value.name for value in graph.input}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer if t.name not in declared]
    skeleton = helper.make_model(helper.make_graph(graph.node, graph.name, [*graph.input, *weights], graph.output),
                                 opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)
    except Exception as error:  # onnx's InferenceError / ValidationError (their module moved between releases)
        raise ArtifactError(f"ONNX type inference failed on the vision graph: {error}") from error
    graph = inferred.graph
    return {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.value_info, *graph.output]}


def _fp16_tensor(tensor: TensorProto, name: str | None = None) -> tuple[TensorProto, int]:
    """`tensor` (fp32) as fp16, values past fp16's range clipped to it; returns it and how many were clipped."""
    values = numpy_helper.to_array(tensor)
    clipped = int(np.count_nonzero(np.abs(values) > FP16_MAX))
    half = np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(half, tensor.name if name is None else name), clipped


def _convert_attributes(node: onnx.NodeProto, counts: dict[str, int]) -> None:
    """Make the fp32 values or output types a node's attributes carry fp16 (Cast, Constant, ConstantOfShape)."""
    for attribute in node.attribute:
        if attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            raise ArtifactError(f"fp16 graph: node {node.name!r} ({node.op_type}) holds a subgraph, which this pass does not convert")
        if node.op_type == "Cast" and attribute.name == "to":
            if attribute.i == FLOAT:
                attribute.i = FLOAT16
        elif attribute.name in _TYPED_ATTRIBUTES and attribute.i == FLOAT:
            raise ArtifactError(f"fp16 graph: node {node.name!r} ({node.op_type}) names fp32 in its {attribute.name!r} attribute")
        elif attribute.type == AttributeProto.TENSOR and attribute.t.data_type == FLOAT:
            half, clipped = _fp16_tensor(attribute.t)
            attribute.t.CopyFrom(half)
            counts["clipped_values"] += clipped
        elif node.op_type == "Constant" and attribute.name in ("value_float", "value_floats"):
            values = np.array(attribute.f if attribute.name == "value_float" else list(attribute.floats), dtype=np.float32)
            half, clipped = _fp16_tensor(numpy_helper.from_array(values))
            node.attribute.remove(attribute)
            node.attribute.append(helper.make_attribute("value", half))
            counts["clipped_values"] += clipped
            return  # the attribute list changed under the loop; a Constant has one value attribute


def convert_to_fp16(model: ModelProto, keep_fp32_ops: tuple[str, ...] = KEEP_FP32_OPS) -> tuple[ModelProto, dict[str, object]]:
    """An fp16 copy of `model` (see the module docstring); returns it and what the artifact manifest records."""
    types = _elem_types(model)
    graph = model.graph
    is_float = lambda name: bool(name) and types.get(name) == FLOAT  # noqa: E731 (a local predicate)
    taken = set(types) | {t.name for t in graph.initializer} | {n.name for n in graph.node}

    def fresh(name: str) -> str:
        if name in taken:
            raise ArtifactError(f"fp16 graph: the name {name!r} is already in the graph")
        taken.add(name)
        return name

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    uses: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            uses[name].append(node)
    # Inside the graph, a float input is read as its fp16 cast and a float output is written as an fp16 tensor.
    inside = {v.name: fresh(f"{v.name}/fp16") for v in [*graph.input, *graph.output] if v.name not in initializers and is_float(v.name)}
    counts = defaultdict(int)
    nodes = [helper.make_node("Cast", [v.name], [inside[v.name]], name=fresh(f"{v.name}/to_fp16"), to=FLOAT16)
             for v in graph.input if v.name in inside]
    fp32_weights: set[str] = set()  # initializers read in fp32 by a kept node
    fp32_copies: list[TensorProto] = []  # fp32 copies of initializers an fp16 node reads too
    fp32_of: dict[str, str] = {}  # fp16 activation -> the same tensor in fp32 (a kept node's output, or one cast up)
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        node.input[:] = [inside.get(name, name) for name in original.input]
        node.output[:] = [inside.get(name, name) for name in original.output]
        if original.op_type not in keep_fp32_ops:
            _convert_attributes(node, counts)
            nodes.append(node)
            continue
        counts["kept_fp32_nodes"] += 1
        for position, name in enumerate(original.input):
            if not is_float(name):
                continue
            if name in initializers:
                if all(user.op_type in keep_fp32_ops for user in uses[name]):
                    fp32_weights.add(name)
                else:  # shared with an fp16 node: the kept node reads its own fp32 copy
                    copy_name = f"{name}/fp32"
                    if copy_name not in fp32_weights:
                        fp32_copies.append(numpy_helper.from_array(numpy_helper.to_array(initializers[name]), fresh(copy_name)))
                        fp32_weights.add(copy_name)
                    node.input[position] = copy_name
                continue
            half = node.input[position]
            if half not in fp32_of:
                fp32_of[half] = fresh(f"{half}/fp32")
                nodes.append(helper.make_node("Cast", [half], [fp32_of[half]], name=fresh(f"{half}/to_fp32"), to=FLOAT))
                counts["casts_added"] += 1
            node.input[position] = fp32_of[half]
        downs = []
        for position, name in enumerate(original.output):
            if is_float(name):
                half = node.output[position]
                node.output[position] = fp32_of[half] = fresh(f"{half}/fp32")
                downs.append(helper.make_node("Cast", [node.output[position]], [half], name=fresh(f"{half}/to_fp16"), to=FLOAT16))
        nodes += [node, *downs]
        counts["casts_added"] += len(downs)
    nodes += [helper.make_node("Cast", [inside[v.name]], [v.name], name=fresh(f"{v.name}/to_fp32"), to=FLOAT)
              for v in graph.output if v.name in inside]
    counts["casts_added"] += len(inside)

    result = ModelProto()
    result.CopyFrom(model)  # inputs, outputs (fp32, unchanged), opsets, metadata; nodes and weights are replaced below
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    result.graph.initializer.extend(fp32_copies)
    del result.graph.value_info[:]  # the types changed: stale value_info would contradict them
    for tensor in result.graph.initializer:
        if tensor.data_type == FLOAT and tensor.name not in fp32_weights:
            half, clipped = _fp16_tensor(tensor)
            tensor.CopyFrom(half)
            counts["initializers_fp16"] += 1
            counts["clipped_values"] += clipped
    _elem_types(result)  # strict type check of the result: every node's inputs agree in type
    details = {"fp16_pass": FP16_PASS_VERSION, "kept_fp32_ops": list(keep_fp32_ops), "io": "fp32",
               **{k: counts[k] for k in ("kept_fp32_nodes", "casts_added", "initializers_fp16", "clipped_values")}}
    if counts["clipped_values"]:
        logger.warning("fp16 graph: %d weight values were past fp16's range and were clipped", counts["clipped_values"])
    return result, details


def write_fp16_graph(source: Path, path: Path, external_data_name: str | None = None) -> dict[str, object]:
    """Convert the fp32 graph at `source` and write it to `path` (weights in `external_data_name` past 2 GB)."""
    half, details = convert_to_fp16(onnx.load(str(source)))
    details |= save_graph(half, path, external_data_name)
    logger.info("wrote the fp16 graph %s (%.1f MB) from %s", path, path.stat().st_size / 1e6, source.name)
    return {"source": source.name, **details}


def fp16_onnx_artifact(vision: VisionPath | None, model_dir: Path, engines_dir: Path | None, build: bool | str,
                       opset: int = OPSET) -> Artifact:
    """The fp16 vision graph from the artifact cache, made from the cached fp32 graph when missing or stale and `build`
    (the policy, see get_or_build) allows; `vision` as for onnx_artifact."""
    source = onnx_artifact(vision, model_dir, engines_dir, "if_missing" if engine_build_policy(build) == "always" else build, opset)
    key = ArtifactKey(
        model_hash=model_fingerprint(model_dir), component="vision", precision=f"onnx-fp16-opset{opset}", runtime="onnx",
        runtime_version=f"onnx {onnx.__version__}", device="any", suffix="onnx",
        extra={"tensors": list(TENSOR_NAMES["vision"]), "source_sha256": source.manifest["sha256"],
               "fp16_pass": FP16_PASS_VERSION, "kept_fp32_ops": list(KEEP_FP32_OPS)},
    )
    command = build_command(model_dir, ["--vision", "tensorrt", "--precision", "fp16"], engines_dir)
    return get_or_build(key, lambda path: write_fp16_graph(source.path, path, key.filename + ".data"), engines_dir, build,
                        command=command)
