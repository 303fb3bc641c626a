"""The fp16 vision graph (what TensorRT 11 builds fp16 engines from): its structure, and its numbers against the fp32
graph in ONNX Runtime on the CPU (which runs fp16 ops), on tiny graphs and (slow) at CLIP ViT-L/14-336 + LDPv2 size."""

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mobilevlm_ros.errors import ArtifactError
from mobilevlm_ros.export.onnx import export_onnx
from mobilevlm_ros.export.onnx_fp16 import FP16_MAX, convert_to_fp16, fp16_onnx_artifact, write_fp16_graph
from mobilevlm_ros.model.checkpoint import load_checkpoint
from mobilevlm_ros.runtime.vision import OnnxRuntimeVision, TorchVision
from vision_graphs import cosine, pixels, real_size_vision_model

CPU = torch.device("cpu")
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    return types | {t.name: t.data_type for t in inferred.initializer}


@pytest.mark.parametrize("projector", ["ldpnetv2", "ldpnet", "mlp2x_gelu"])
def test_fp16_graph_keeps_layer_norm_and_io_fp32_and_matches_fp32(make_checkpoint, tmp_path, projector, figures):
    vision = load_checkpoint(make_checkpoint(projector_type=projector, dtype=torch.float32)).model.vision_path
    export_onnx(vision, tmp_path / "vision.onnx")
    details = write_fp16_graph(tmp_path / "vision.onnx", tmp_path / "vision-fp16.onnx")
    half = onnx.load(str(tmp_path / "vision-fp16.onnx"))
    types = elem_types(half)
    graph = half.graph
    # The interface stays fp32; inside, every float tensor is fp16 except what LayerNormalization reads and writes.
    assert [types[v.name] for v in [*graph.input, *graph.output]] == [FLOAT, FLOAT]
    norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
    assert len(norms) == details["kept_fp32_nodes"] > 0
    norm_tensors = {name for node in norms for name in [*node.input, *node.output] if name}
    interface = {v.name for v in [*graph.input, *graph.output]}
    assert {name for name, kind in types.items() if kind == FLOAT} == norm_tensors | interface
    assert all(types[name] == FLOAT for node in norms for name in [*node.input, *node.output] if name)
    weights = collections.Counter(t.data_type for t in graph.initializer)
    assert weights[FLOAT16] == details["initializers_fp16"] and weights[FLOAT] == 2 * len(norms)  # each norm's scale and bias
    assert details["clipped_values"] == 0
    # ONNX Runtime on the CPU runs the fp16 ops: the graph loads and agrees with the fp32 graph to fp16 precision.
    x = pixels(2)
    fp32 = OnnxRuntimeVision(tmp_path / "vision.onnx", CPU)(x)
    fp16 = OnnxRuntimeVision(tmp_path / "vision-fp16.onnx", CPU)(x)
    assert fp16.dtype == torch.float32 and fp16.shape == fp32.shape
    error, similarity = (fp16 - fp32).abs().max().item(), cosine(fp16, fp32)
    figures[f"fp16 graph vs fp32, tiny {projector}"] = {"max_abs": round(error, 5), "cosine": round(similarity, 7),
                                                       "max_abs_value": round(fp32.abs().max().item(), 3)}
    assert similarity >= 0.9999
    assert 1e-5 < error <= 2e-3 * fp32.abs().max().item()  # fp16 rounding is there, and only fp16 rounding
    assert (fp32 - TorchVision(vision)(x)).abs().max().item() <= 1e-4


def test_fp16_graph_artifact_is_cached_and_follows_the_fp32_graph(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint(dtype=torch.float32)
    vision = load_checkpoint(checkpoint).model.vision_path
    first = fp16_onnx_artifact(vision, checkpoint, tmp_path, build=True)
    assert first.built and first.manifest["precision"] == "onnx-fp16-opset17"
    assert first.manifest["details"]["source"].startswith("vision-onnx-opset17-")  # made from the cached fp32 graph
    assert first.manifest["extra"]["kept_fp32_ops"] == ["LayerNormalization"]
    again = fp16_onnx_artifact(vision, checkpoint, tmp_path, build=False)
    assert not again.built and again.path == first.path
    with pytest.raises(ArtifactError, match="not built yet, and building is disabled"):
        fp16_onnx_artifact(vision, checkpoint, tmp_path / "empty", build=False)


def constant_graph(nodes: list, inputs: list, outputs: list, initializers: list = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constants_casts_and_out_of_range_weights():
    """Constant (tensor and value_float), ConstantOfShape and Cast-to-float become fp16; a weight past fp16's range is
    clipped and counted; a weight read by both a LayerNorm and an fp16 op gets an fp32 copy for the LayerNorm."""
    x = helper.make_tensor_value_info("x", FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 4])
    big = numpy_helper.from_array(np.array([1.0, 2.0, 1e6, -3.0], np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Constant", [], ["d"], value_float=2.0),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([2, 4], np.int64))),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Mul", ["x", "c"], ["a"]),
        helper.make_node("Add", ["a", "w"], ["b"]),
        helper.make_node("Cast", ["b"], ["b32"], to=FLOAT),
        helper.make_node("LayerNormalization", ["b32", "w", "w"], ["n"], axis=-1),
        helper.make_node("Mul", ["n", "d"], ["e"]),
        helper.make_node("Add", ["e", "ones"], ["y"]),
    ]
    model = constant_graph(nodes, [x], [y], [big])
    half, details = convert_to_fp16(model)
    types = elem_types(half)
    assert types["c"] == types["d"] == types["ones"] == types["a"] == types["b32"] == types["e"] == FLOAT16
    assert types["w"] == FLOAT16 and types["w/fp32"] == FLOAT and types["shape"] == TensorProto.INT64
    weights = {t.name: numpy_helper.to_array(t) for t in half.graph.initializer}
    assert weights["w"][2] == np.float16(FP16_MAX) and weights["w/fp32"][2] == 1e6
    assert details["clipped_values"] == 1 and details["kept_fp32_nodes"] == 1
    norm = next(node for node in half.graph.node if node.op_type == "LayerNormalization")
    assert list(norm.input) == ["b32/fp32", "w/fp32", "w/fp32"] and list(norm.output) == ["n/fp32"]
    onnx.checker.check_model(half)


def test_graph_input_read_by_a_layer_norm_and_a_norm_output_as_graph_output():
    x = helper.make_tensor_value_info("x", FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 4])
    scale = numpy_helper.from_array(np.ones(4, np.float32), "s")
    model = constant_graph([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1)], [x], [y], [scale])
    half, details = convert_to_fp16(model)
    types = elem_types(half)
    assert types["x"] == types["y"] == types["s"] == FLOAT and details["initializers_fp16"] == 0
    import onnxruntime

    session = onnxruntime.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    data = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    expected = (data - data.mean(-1, keepdims=True)) / np.sqrt(data.var(-1, keepdims=True) + 1e-5)
    assert np.abs(session.run(None, {"x": data})[0] - expected).max() < 5e-3


def test_nodes_the_pass_cannot_type_are_refused():
    x = helper.make_tensor_value_info("x", FLOAT, [2])
    y = helper.make_tensor_value_info("y", FLOAT, [2])
    random = constant_graph(
        [helper.make_node("RandomNormalLike", ["x"], ["r"], dtype=FLOAT), helper.make_node("Add", ["x", "r"], ["y"])], [x], [y])
    with pytest.raises(ArtifactError, match="RandomNormalLike.*names fp32 in its 'dtype' attribute"):
        convert_to_fp16(random)
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [], [helper.make_tensor_value_info("z", FLOAT, [2])])
    condition = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    conditional = constant_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], [x, condition], [y])
    with pytest.raises(ArtifactError, match="holds a subgraph"):
        convert_to_fp16(conditional)


@pytest.mark.slow
def test_real_size_fp16_graph_matches_fp32(tmp_path, figures):
    """CLIP ViT-L/14-336 + LDPv2 at MobileVLM 1.7B width with random weights: the fp16 graph against the fp32 graph in
    ONNX Runtime (random weights do not have real CLIP's outlier channels: this measures the pass and fp16 rounding)."""
    model = real_size_vision_model()
    export_onnx(model.vision_path, tmp_path / "vision.onnx")
    del model
    details = write_fp16_graph(tmp_path / "vision.onnx", tmp_path / "vision-fp16.onnx")
    assert details["kept_fp32_nodes"] == 2 * 23 + 1 and details["clipped_values"] == 0  # pre-norm + 2 per layer run
    x = pixels(1)
    fp32 = OnnxRuntimeVision(tmp_path / "vision.onnx", CPU)(x).flatten()
    (tmp_path / "vision.onnx").unlink()
    fp16 = OnnxRuntimeVision(tmp_path / "vision-fp16.onnx", CPU)(x).flatten()
    error, similarity = (fp16 - fp32).abs().max().item(), cosine(fp16, fp32)
    figures["fp16 graph vs fp32, CLIP-L + LDPv2 (1.7B)"] = {"max_abs": round(error, 5), "cosine": round(similarity, 7),
                                                             "max_abs_value": round(fp32.abs().max().item(), 3)}
    assert similarity >= 0.999
    assert error <= 1e-2 * fp32.abs().max().item()
