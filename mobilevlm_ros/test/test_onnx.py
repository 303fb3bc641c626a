"""ONNX export of the vision path and the ONNX Runtime / TensorRT backends against torch."""

import onnx
import pytest
import torch

from mobilevlm_ros.export import onnx as onnx_export
from mobilevlm_ros.export.onnx import export_onnx, onnx_artifact, quantize_onnx
from mobilevlm_ros.model.checkpoint import is_vision_key, load_checkpoint
from mobilevlm_ros.runtime.vision import OnnxRuntimeVision, TorchVision
from mobilevlm_ros.runtime.vlm import MobileVLM
from mobilevlm_ros.tensorrt_support import tensorrt_unavailable_reason
from vision_graphs import cosine, pixels, real_size_vision_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("projector", ["ldpnetv2", "ldpnet", "mlp2x_gelu"])
def test_vision_graph_equals_torch(make_checkpoint, tmp_path, projector):
    vision = load_checkpoint(make_checkpoint(projector_type=projector, dtype=torch.float32)).model.vision_path
    details = export_onnx(vision, tmp_path / "vision.onnx")
    assert details == {"part": "vision", "input": "pixel_values", "output": "image_embeds", "opset": 17}
    backend = OnnxRuntimeVision(tmp_path / "vision.onnx", CPU)
    for batch in (1, 3):  # the batch dimension is dynamic (tiles)
        x = pixels(batch, seed=batch)
        expected = TorchVision(vision)(x)
        assert (backend(x) - expected).abs().max().item() <= 1e-4


def test_graph_stops_at_the_selected_layer_and_keeps_layer_norm_whole(make_checkpoint, tmp_path):
    vision = load_checkpoint(make_checkpoint(dtype=torch.float32)).model.vision_path
    export_onnx(vision, tmp_path / "vision.onnx")
    graph = onnx.load(str(tmp_path / "vision.onnx")).graph
    names = " ".join(node.name for node in graph.node)
    assert "layers.1/" in names and "layers.2/" not in names  # 3 layers, select -2: layers 0 and 1 only
    assert "post_layernorm" not in names
    assert any(node.op_type == "LayerNormalization" for node in graph.node)


def test_split_graphs_chain_to_the_single_graph(make_checkpoint, tmp_path):
    vision = load_checkpoint(make_checkpoint(projector_type="ldpnet", dtype=torch.float32)).model.vision_path
    export_onnx(vision, tmp_path / "vit.onnx", "vit")
    export_onnx(vision, tmp_path / "projector.onnx", "projector")
    vit = OnnxRuntimeVision(tmp_path / "vit.onnx", CPU, "pixel_values", "image_features")
    projector = OnnxRuntimeVision(tmp_path / "projector.onnx", CPU, "image_features", "image_embeds")
    x = pixels(2)
    features = vit(x)
    assert features.shape == (2, 576, 32)
    assert (projector(features) - TorchVision(vision)(x)).abs().max().item() <= 1e-4


def test_large_graphs_keep_weights_in_one_external_file(make_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 10_000)  # pretend the tiny graph is past 2 GB
    vision = load_checkpoint(make_checkpoint(dtype=torch.float32)).model.vision_path
    details = export_onnx(vision, tmp_path / "vision.onnx")
    assert details["external_data"] == "vision.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert (tmp_path / "vision.onnx").stat().st_size < 100_000
    x = pixels(1)
    assert (OnnxRuntimeVision(tmp_path / "vision.onnx", CPU)(x) - TorchVision(vision)(x)).abs().max().item() <= 1e-4


def test_fp16_model_exports_an_fp32_graph_and_keeps_its_dtype(make_checkpoint, tmp_path):
    vision = load_checkpoint(make_checkpoint(dtype=torch.float32)).model.vision_path
    half = load_checkpoint(make_checkpoint(dtype=torch.float32), dtype=torch.float16).model.vision_path
    export_onnx(half, tmp_path / "vision.onnx")
    graph = onnx.load(str(tmp_path / "vision.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.dtype == torch.float16  # the serving model is untouched
    x = pixels(1)
    # The graph holds the fp16 weights widened to fp32: it equals the fp32 model up to fp16 rounding of the weights.
    assert cosine(OnnxRuntimeVision(tmp_path / "vision.onnx", CPU)(x), TorchVision(vision)(x)) >= 0.999


def test_int8_graph_is_quantized_and_close_to_torch(make_checkpoint, tmp_path):
    vision = load_checkpoint(make_checkpoint(dtype=torch.float32)).model.vision_path
    int8 = onnx_artifact(vision, make_checkpoint(dtype=torch.float32), tmp_path, build=True, precision="int8")
    assert int8.built and int8.manifest["precision"] == "onnx-int8-opset17"
    assert int8.manifest["details"]["source"].startswith("vision-onnx-opset17-")  # made from the cached fp32 graph
    graph = onnx.load(str(int8.path)).graph
    weights = {tensor.name for tensor in graph.initializer}
    assert "MatMulInteger" in {node.op_type for node in graph.node}
    # Every MatMul by a weight is quantized; attention's activation-by-activation MatMuls stay fp32.
    assert not [node.name for node in graph.node if node.op_type == "MatMul" and weights & set(node.input)]
    fp32 = onnx_artifact(vision, make_checkpoint(dtype=torch.float32), tmp_path, build=False)
    quantized = [tensor for tensor in graph.initializer if tensor.name.endswith("_quantized")]
    assert quantized and all(tensor.data_type == onnx.TensorProto.INT8 for tensor in quantized)
    assert int8.path.stat().st_size < fp32.path.stat().st_size  # the tiny tower's convolutions stay fp32
    backend = OnnxRuntimeVision(int8.path, CPU)
    x = pixels(3)  # a dynamic batch, as tiles need
    ours, expected = backend(x), TorchVision(vision)(x)
    assert ours.shape == expected.shape
    assert cosine(ours, expected) >= 0.99
    assert (ours - expected).abs().max().item() > 1e-6  # quantization did change the numbers


def test_onnxruntime_uses_torch_thread_count(make_checkpoint, tmp_path):
    vision = load_checkpoint(make_checkpoint(dtype=torch.float32)).model.vision_path
    export_onnx(vision, tmp_path / "vision.onnx")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        backend = OnnxRuntimeVision(tmp_path / "vision.onnx", CPU)
    finally:
        torch.set_num_threads(threads)
    assert backend.threads == 1
    assert backend.session.get_session_options().intra_op_num_threads == 1


def test_the_onnxruntime_backend_frees_the_torch_vision_path(make_checkpoint, tmp_path, camera_image):
    """Once the graph runs the vision path, the torch LLM holds no vision weights (ViT-L would be held twice)."""
    checkpoint = make_checkpoint(dtype=torch.float32)
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu", vision="onnxruntime", engines_dir=tmp_path)
    assert vlm.vision.name == "onnxruntime" and vlm.device == CPU
    assert not [name for name, _ in vlm.language.model.named_parameters() if is_vision_key(name)]
    expected = MobileVLM.from_pretrained(checkpoint, device="cpu").ask(camera_image, "What is here?", max_new_tokens=4)
    assert vlm.ask(camera_image, "What is here?", max_new_tokens=4) == expected


def test_unreadable_graph_is_a_clear_error(tmp_path):
    from mobilevlm_ros.errors import BackendError

    (tmp_path / "vision.onnx").write_bytes(b"garbage")
    with pytest.raises(BackendError, match="vision.onnx: ONNX Runtime cannot load the vision graph"):
        OnnxRuntimeVision(tmp_path / "vision.onnx", CPU)


@pytest.mark.slow
def test_real_size_vision_graph_matches_torch(tmp_path):
    """fp32 and int8 graphs at CLIP ViT-L/14-336 + LDPv2 (1.7B) size against torch."""
    vision = real_size_vision_model().vision_path
    export_onnx(vision, tmp_path / "vision.onnx")
    x = pixels(1)
    expected = TorchVision(vision)(x).flatten()
    del vision
    ours = OnnxRuntimeVision(tmp_path / "vision.onnx", CPU)(x).flatten()
    assert ours.shape == (144 * 2048,)
    assert cosine(ours, expected) >= 0.999
    quantize_onnx(tmp_path / "vision.onnx", tmp_path / "vision-int8.onnx")
    (tmp_path / "vision.onnx").unlink()
    int8 = OnnxRuntimeVision(tmp_path / "vision-int8.onnx", CPU)(x).flatten()
    assert cosine(int8, expected) >= 0.999


TRT_REASON = tensorrt_unavailable_reason()


@pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT tests need TensorRT and a CUDA GPU: {TRT_REASON}")
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 0.999)])
def test_tensorrt_engine_matches_torch(make_checkpoint, tmp_path, precision, tolerance):
    """Built from the graph this TensorRT's plan names (TensorRT 11: fp16 from the fp16 graph); fp32 has TF32 off."""
    import tensorrt as trt

    from mobilevlm_ros.export.onnx_fp16 import write_fp16_graph
    from mobilevlm_ros.export.tensorrt import build_engine, build_plan
    from mobilevlm_ros.runtime.tensorrt import TensorRTVision

    vision = load_checkpoint(make_checkpoint(dtype=torch.float32)).model.vision_path
    graph = tmp_path / "vision.onnx"
    export_onnx(vision, graph)
    if build_plan(trt, precision).graph == "fp16":
        write_fp16_graph(graph, tmp_path / "vision-fp16.onnx")
        graph = tmp_path / "vision-fp16.onnx"
    details = build_engine(graph, tmp_path / "vision.engine", precision, 336, max_batch=4,
                           timing_cache_path=tmp_path / f"timing-{precision}.cache")
    assert details["tf32"] == (precision != "fp32")
    engine = TensorRTVision(tmp_path / "vision.engine", torch.device("cuda"))
    x = pixels(2)
    ours = engine(x).float().cpu()
    expected = TorchVision(vision)(x)
    if precision == "fp32":
        assert (ours - expected).abs().max().item() <= tolerance
    else:
        assert torch.nn.functional.cosine_similarity(ours.flatten(), expected.flatten(), dim=0).item() >= tolerance
    assert (tmp_path / f"timing-{precision}.cache").stat().st_size > 0


def test_tensorrt_availability_is_explained():
    reason = tensorrt_unavailable_reason()
    assert reason is None or "tensorrt" in reason or "CUDA" in reason
