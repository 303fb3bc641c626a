"""Gates on the versions of what is installed: doctor's TensorRT line, the ONNX exporter's `dynamo` keyword, the int8
torch LLM on CUDA, and setup.py's floors."""

import ast
import importlib.metadata
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from fake_tensorrt import FakeTensorRT
from mobilevlm_ros import doctor, tensorrt_support
from mobilevlm_ros.errors import ConfigError
from mobilevlm_ros.export.onnx import export_onnx, torchscript_exporter
from mobilevlm_ros.model.checkpoint import load_checkpoint
from mobilevlm_ros.runtime.language import TorchLanguageModel, int8_unavailable_reason
from mobilevlm_ros.runtime.vision import OnnxRuntimeVision, TorchVision

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


@pytest.mark.parametrize("label, version, builds", [
    ("10.3", "10.3.0.30", "builds fp16 (builder flag), fp32 (TF32 off), int8 (entropy calibration)"),
    ("11.1", "11.1.0.4",
     "builds fp16 (from an fp16 ONNX graph, LayerNorm fp32), fp32 (TF32 off); not int8: TensorRT 11.1.0.4 builds int8 only"),
])
def test_doctor_reads_the_bindings_version_and_says_what_they_build(monkeypatch, label, version, builds):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(label, version=version))
    monkeypatch.setattr(tensorrt_support, "_trt_logger", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check = doctor._tensorrt_check("NVIDIA Orin (sm_87)")
    assert check.usable and check.detail.startswith(f"{version}; {builds}") and check.detail.endswith("; NVIDIA Orin (sm_87)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check = doctor._tensorrt_check("no CUDA GPU")
    assert not check.usable and check.detail.startswith(f"no CUDA GPU is visible to torch (TensorRT {version}; builds fp16")


def test_doctor_without_tensorrt_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    check = doctor._tensorrt_check("no CUDA GPU")
    assert not check.usable and "tensorrt" in check.detail


def test_dynamo_keyword_only_where_the_exporter_has_it(make_checkpoint, tmp_path, monkeypatch):
    """torch 2.3 (JetPack 6.0) has no `dynamo` parameter; 2.4 on has it, and 2.9 made dynamo the default."""
    real = torch.onnx.export
    assert torchscript_exporter(real) == {"dynamo": False}  # the torch installed here

    def export_of_torch_2_3(model, args, f, export_params=True, verbose=False, training=None, input_names=None,
                            output_names=None, operator_export_type=None, opset_version=None, do_constant_folding=True,
                            dynamic_axes=None):
        calls.append(opset_version)
        return real(model, args, f, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                    opset_version=opset_version, **torchscript_exporter(real))

    calls: list[int] = []
    assert torchscript_exporter(export_of_torch_2_3) == {}
    monkeypatch.setattr(torch.onnx, "export", export_of_torch_2_3)
    vision = load_checkpoint(make_checkpoint(dtype=torch.float32)).model.vision_path
    assert export_onnx(vision, tmp_path / "vision.onnx")["opset"] == 17 and calls == [17]
    x = torch.randn(1, 3, 336, 336)
    assert (OnnxRuntimeVision(tmp_path / "vision.onnx", torch.device("cpu"))(x) - TorchVision(vision)(x)).abs().max() <= 1e-4


def test_int8_llm_is_refused_where_torch_has_no_kernel(monkeypatch):
    assert int8_unavailable_reason(torch.device("cpu")) is None
    probe = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: key == "CPU")  # torch <= 2.8
    reason = int8_unavailable_reason(torch.device("cuda", 0))
    assert "no cuda kernel for int8 weight-only matmuls" in reason and "CUDA from torch 2.9" in reason
    with pytest.raises(ConfigError, match=r"int8 language model on cuda:0: torch .* has no cuda kernel"):
        TorchLanguageModel(SimpleNamespace(device=torch.device("cuda", 0)), 1024, int8=True)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)
    assert int8_unavailable_reason(torch.device("cuda", 0)) is None
    # Without the private probe, the releases: CUDA kernels from 2.9.
    monkeypatch.delattr(torch._C, "_dispatch_has_kernel_for_dispatch_key")
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    assert int8_unavailable_reason(torch.device("cuda")) is not None
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    assert int8_unavailable_reason(torch.device("cuda")) is None
    assert probe("aten::_weight_int8pack_mm", "CPU")


def install_requires() -> list[Requirement]:
    tree = ast.parse(SETUP.read_text(encoding="utf-8"))
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    requires = next(keyword.value for keyword in call.keywords if keyword.arg == "install_requires")
    return [Requirement(ast.literal_eval(item)) for item in requires.elts]


def test_setup_floors_are_met_here_and_cover_what_the_code_uses():
    floors = {req.name: req.specifier for req in install_requires()}
    assert str(floors["torch"]) == ">=2.4" and str(floors["transformers"]) == ">=5.14"
    assert str(floors["numpy"]) == ">=1.21" and str(floors["pillow"]) == ">=9.1"
    for name, specifier in floors.items():  # the floors are at or below what this suite runs with
        installed = Version(importlib.metadata.version(name))
        assert specifier.contains(installed, prereleases=True), (name, str(specifier), str(installed))
    from transformers.cache_utils import StaticLayer  # the static KV cache moves this counter (runtime/language.py)

    assert "cumulative_length" in inspect.getsource(StaticLayer.__init__)
