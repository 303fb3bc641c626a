"""Our TensorRT version gating, on the CPU: the builder and the runtime helpers run against a stand-in `tensorrt`
module for each recorded release (8.6, 10.3, 10.16, 11.0, 11.1; tensorrt_api.json, read from NVIDIA/TensorRT's
bindings at each tag) that has only that release's names and raises AttributeError for anything else.

This checks OUR gating (that we call only what each release has, and pick the right build for it), not TensorRT
itself: the real engine tests in test_onnx.py still run wherever TensorRT imports. Also here: the engine cache key,
the timing cache, the calibrator's exceptions, the one Logger per process, and doctor's precision line.
"""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from fake_tensorrt import API, FakeTensorRT
from mobilevlm_ros import tensorrt_support
from mobilevlm_ros.errors import ArtifactError, BackendError
from mobilevlm_ros.export import tensorrt as export_trt
from mobilevlm_ros.export.tensorrt import (
    build_engine,
    build_plan,
    engine_covering,
    engine_key,
    gpu_description,
    timing_cache_path,
    write_atomically,
)
from mobilevlm_ros.runtime.tensorrt import EngineIO, engine_io, enqueue, set_batch_shape
from mobilevlm_ros.tensorrt_support import describe_precisions, precision_support, tensorrt_logger, tensorrt_unavailable_reason

VERSIONS = sorted(API, key=lambda label: tuple(map(int, label.split("."))))
STRONGLY_TYPED = [label for label in VERSIONS if int(label.split(".")[0]) >= 11]
WEAKLY_TYPED = [label for label in VERSIONS if label not in STRONGLY_TYPED]
CPU = torch.device("cpu")


@pytest.fixture
def fake(request, monkeypatch) -> FakeTensorRT:
    """`import tensorrt` answers with the stand-in for the release named by the test's `label` parameter."""
    module = FakeTensorRT(request.param if hasattr(request, "param") else "11.1")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(tensorrt_support, "_trt_logger", None)  # one Logger per process: this test's process is the fake's
    return module


def graph_file(tmp_path: Path) -> Path:
    path = tmp_path / "vision.onnx"
    path.write_bytes(b"an ONNX graph (the stand-in parser only checks that the file is there)")
    return path


def test_the_recorded_releases_are_the_supported_ones():
    assert VERSIONS == ["8.6", "10.3", "10.16", "11.0", "11.1"]
    for label, entry in API.items():
        assert entry["tag"].startswith("v") and entry["version"].startswith(label)
        assert all(c["source"].startswith(f"https://github.com/NVIDIA/TensorRT/blob/{entry['tag']}/") for c in entry["classes"].values())
    # What the migration guide says 11 removed, the recorded bindings lack; 10.x still has it.
    for label in STRONGLY_TYPED:
        classes = API[label]["classes"]
        assert not {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"} & set(classes["BuilderFlag"]["members"])
        assert "int8_calibrator" not in classes["IBuilderConfig"]["members"] and "precision" not in classes["ILayer"]["members"]
        assert "IInt8EntropyCalibrator2" not in API[label]["module"]
        assert "EXPLICIT_BATCH" not in classes["NetworkDefinitionCreationFlag"]["members"]
    for label in WEAKLY_TYPED:
        assert {"FP16", "INT8", "TF32"} <= set(API[label]["classes"]["BuilderFlag"]["members"])


@pytest.mark.parametrize("fake", VERSIONS, indirect=True)
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_build_engine_calls_only_what_the_release_has(fake, tmp_path, precision):
    timing = tmp_path / "timing.cache"
    details = build_engine(graph_file(tmp_path), tmp_path / "vision.engine", precision, 336, max_batch=4,
                           workspace_bytes=256 << 20, timing_cache_path=timing, device=CPU)
    assert (tmp_path / "vision.engine").read_bytes() == b"serialized engine"
    strongly_typed = fake.label in STRONGLY_TYPED
    set_flags = [flag.name for (flag,) in fake.called("IBuilderConfig.set_flag")]
    cleared = [flag.name for (flag,) in fake.called("IBuilderConfig.clear_flag")]
    assert set_flags == (["FP16"] if precision == "fp16" and not strongly_typed else [])
    assert cleared == (["TF32"] if precision == "fp32" else [])  # "fp32" engines are fp32, not TF32
    (flags,) = fake.called("Builder.create_network")
    assert flags == ((1 << int(fake.NetworkDefinitionCreationFlag.EXPLICIT_BATCH),) if fake.label == "8.6" else (0,))
    assert fake.called("IBuilderConfig.set_memory_pool_limit") == [(fake.MemoryPoolType.WORKSPACE, 256 << 20)]
    assert fake.called("IOptimizationProfile.set_shape") == [("pixel_values", (1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336))]
    assert details | {"tensorrt": None} == {
        "max_batch": 4, "workspace_bytes": 256 << 20, "tensorrt": None,
        "graph": "fp16" if strongly_typed and precision == "fp16" else "fp32",
        "network": "strongly typed" if strongly_typed else "weakly typed",
        "flags": set_flags, "tf32": precision != "fp32",
    }
    assert timing.read_bytes() == b"+timed" and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("fake", WEAKLY_TYPED, indirect=True)
def test_int8_calibrates_where_the_release_has_calibrators(fake, tmp_path):
    batches = [torch.rand(2, 3, 336, 336), torch.rand(2, 3, 336, 336)]
    details = build_engine(graph_file(tmp_path), tmp_path / "vision.engine", "int8", 336, calibration=batches, device=CPU)
    assert [flag.name for (flag,) in fake.called("IBuilderConfig.set_flag")] == ["FP16", "INT8"]
    assert len(fake.called("IBuilderConfig.int8_calibrator=")) == 1
    assert fake.called("IOptimizationProfile.set_shape")[-1] == ("pixel_values", *[(2, 3, 336, 336)] * 3)
    assert details["calibration_images"] == 4 and len(details["calibration_sha256"]) == 64
    # The calibrator overrides only methods the release's IInt8EntropyCalibrator2 declares.
    calibrator = fake.called("IBuilderConfig.int8_calibrator=")[0][0]
    ours = {name for name in vars(type(calibrator)) if not name.startswith("_")}
    assert ours <= set(fake.members("IInt8EntropyCalibrator2"))


@pytest.mark.parametrize("fake", WEAKLY_TYPED, indirect=True)
def test_an_exception_in_get_batch_is_raised_after_the_build(fake, tmp_path):
    """TensorRT calls get_batch from C++ and drops a Python exception (the stand-in does the same): the build must
    still fail with it, not produce an engine calibrated on fewer batches."""
    batches = [torch.rand(2, 3, 336, 336), torch.rand(3, 3, 336, 336)]  # the second does not fit the buffer
    with pytest.raises(ArtifactError, match="int8 calibration failed") as raised:
        build_engine(graph_file(tmp_path), tmp_path / "vision.engine", "int8", 336, calibration=batches, device=CPU)
    assert isinstance(raised.value.__cause__, RuntimeError) and "size" in str(raised.value.__cause__)
    assert not (tmp_path / "vision.engine").exists()


@pytest.mark.parametrize("fake", STRONGLY_TYPED, indirect=True)
def test_int8_is_refused_on_strongly_typed_releases(fake, tmp_path):
    with pytest.raises(ArtifactError,
                       match=r"cannot build an engine in int8: TensorRT 11\.\d\.0 builds int8 only from explicitly quantized \(Q/DQ\)"):
        build_engine(graph_file(tmp_path), tmp_path / "vision.engine", "int8", 336, calibration=[torch.rand(1, 3, 336, 336)], device=CPU)
    assert fake.calls == []  # refused before TensorRT is touched


@pytest.mark.parametrize("fake", VERSIONS, indirect=True)
def test_build_plan_per_release(fake):
    strongly_typed = fake.label in STRONGLY_TYPED
    assert build_plan(fake, "fp16").graph == ("fp16" if strongly_typed else "fp32")
    assert build_plan(fake, "fp32") == export_trt.BuildPlan("fp32", "fp32", strongly_typed, (), False)
    assert precision_support(fake)["int8"] is None or strongly_typed
    line = describe_precisions(fake)
    assert line.startswith("builds fp16 (from an fp16 ONNX graph" if strongly_typed else "builds fp16 (builder flag)")
    assert ("int8 (entropy calibration)" in line) != strongly_typed
    with pytest.raises(ArtifactError, match="unknown TensorRT precision 'bf16'"):
        build_plan(fake, "bf16")


def test_tensorrt_8_5_is_refused_with_the_jetpack_it_needs(monkeypatch):
    old = FakeTensorRT("8.6", version="8.5.2.2")
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(ArtifactError, match=r"TensorRT 8\.5\.2\.2 is not supported.*JetPack 6 or later"):
        build_plan(old, "fp16")
    assert "JetPack 6 or later" in tensorrt_unavailable_reason()


@pytest.mark.parametrize("fake", VERSIONS, indirect=True)
def test_runtime_helpers_use_only_the_name_based_api(fake):
    runtime = fake.Runtime(tensorrt_logger(fake))
    engine = runtime.deserialize_cuda_engine(b"serialized engine")
    io = engine_io(fake, engine)
    assert io == EngineIO("pixel_values", "image_embeds", torch.float32, torch.float32, 4)
    context = engine.create_execution_context()
    assert set_batch_shape(context, io, (3, 3, 336, 336)) == (3, 144, 2048)
    enqueue(context, io, 1000, 2000, 7)
    assert fake.called("IExecutionContext.set_tensor_address") == [("pixel_values", 1000), ("image_embeds", 2000)]
    assert fake.called("IExecutionContext.execute_async_v3") == [(7,)]
    with pytest.raises(BackendError, match=r"takes pixel_values of shape \[1\.\.4, 3, S, S\]"):
        set_batch_shape(context, io, (5, 3, 336, 336))


@pytest.mark.parametrize("fake", ["10.3"], indirect=True)
def test_one_logger_per_process(fake, tmp_path):
    build_engine(graph_file(tmp_path), tmp_path / "a.engine", "fp16", 336, device=CPU)
    build_engine(graph_file(tmp_path), tmp_path / "b.engine", "fp32", 336, device=CPU)
    fake.Runtime(tensorrt_logger(fake))
    assert fake.loggers == 1


@pytest.mark.parametrize("fake", ["11.1"], indirect=True)
def test_timing_cache_survives_a_failed_build_and_a_corrupt_file(fake, tmp_path):
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"garbage from a killed build")
    build_engine(graph_file(tmp_path), tmp_path / "vision.engine", "fp16", 336, timing_cache_path=timing, device=CPU)
    assert timing.read_bytes() == b"+timed"  # the unreadable cache was replaced by a fresh one
    fake.fail_build = True
    with pytest.raises(ArtifactError, match="TensorRT failed to build an engine"):
        build_engine(graph_file(tmp_path), tmp_path / "other.engine", "fp16", 336, timing_cache_path=timing, device=CPU)
    assert timing.read_bytes() == b"+timed"  # a failed build leaves the cache as it was


def test_timing_caches_are_per_precision_version_and_gpu(tmp_path):
    paths = {timing_cache_path(tmp_path, version, gpu, precision)
             for version in ("10.3.0", "11.1.0") for gpu in ("cuda:NVIDIA Orin sm_87", "cuda:NVIDIA H200 sm_90")
             for precision in ("fp16", "fp32", "int8")}
    assert len(paths) == 12 and all(path.parent == tmp_path and " " not in path.name for path in paths)
    target = tmp_path / "file"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


PLAN = export_trt.BuildPlan("fp16", "fp32", False, ("FP16",), True)

# What torch reports on each Jetson Orin module (name, SM count, total memory as the GPU sees the shared DRAM).
ORIN_MODULES = {
    "AGX Orin 64GB": ("Orin", 16, 61.4), "AGX Orin 32GB": ("Orin", 14, 30.0), "Orin NX 16GB": ("Orin", 8, 15.3),
    "Orin Nano 8GB": ("Orin", 8, 7.4), "Orin Nano 4GB": ("Orin", 4, 3.4),
}


def test_the_device_key_tells_the_orin_modules_apart(monkeypatch):
    def properties(name: str, sms: int, gib: float):
        return lambda index: type("Properties", (), {"name": name, "major": 8, "minor": 7, "multi_processor_count": sms,
                                                    "total_memory": int(gib * 2**30)})()

    described = {}
    for module, spec in ORIN_MODULES.items():
        monkeypatch.setattr(torch.cuda, "get_device_properties", properties(*spec))
        described[module] = gpu_description(torch.device("cuda", 0))
    assert described["Orin Nano 8GB"] == "cuda:Orin sm_87 8 SMs 7 GiB"
    assert len(set(described.values())) == len(ORIN_MODULES)
    # A few MB more or less (another JetPack's carve-outs) is the same device.
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties("Orin", 8, 7.45))
    assert gpu_description(torch.device("cuda", 0)) == described["Orin Nano 8GB"]


def test_engine_key_holds_what_decides_the_numbers_not_build_settings():
    key = engine_key("ab" * 32, "fp16", 336, "10.3.0", "cuda:NVIDIA Orin sm_87", PLAN)
    assert key.extra == {"image_size": 336, "graph": "fp32", "network": "weakly typed", "flags": ["FP16"], "tf32": True}
    assert "max_batch" not in json.dumps(key.fields()) and "workspace" not in json.dumps(key.fields())
    fp32 = dataclasses.replace(PLAN, precision="fp32", flags=(), tf32=False)
    assert engine_key("ab" * 32, "fp32", 336, "10.3.0", "cuda:NVIDIA Orin sm_87", fp32).filename != key.filename


class EngineBuilds:
    """A build function writing an engine whose manifest records `max_batch`, counting its calls."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.calls = 0

    def __call__(self, path: Path) -> dict:
        self.calls += 1
        path.write_bytes(b"engine for %d" % self.max_batch)
        return {"max_batch": self.max_batch, "workspace_bytes": 1 << 29}


def test_runtime_takes_any_cached_profile_and_a_build_rebuilds_only_a_smaller_one(tmp_path):
    key = engine_key("ab" * 32, "fp16", 336, "10.3.0", "cuda:NVIDIA Orin sm_87", PLAN)
    built = engine_covering(key, EngineBuilds(4), tmp_path, build=True, max_batch=4)  # `mobilevlm build --max-batch 4`
    assert built.built and built.manifest["details"] == {"max_batch": 4, "workspace_bytes": 1 << 29}
    # The node (max_batch None, building disabled) takes it: no "stale" rebuild with the LLM loaded.
    assert not engine_covering(key, EngineBuilds(8), tmp_path, build=False, max_batch=None).built
    assert not engine_covering(key, EngineBuilds(8), tmp_path, build=True, max_batch=2).built  # 4 covers 2
    with pytest.raises(ArtifactError, match=r"its profile takes batches up to 4, not 8, and building is disabled"):
        engine_covering(key, EngineBuilds(8), tmp_path, build=False, max_batch=8)
    bigger = EngineBuilds(8)
    rebuilt = engine_covering(key, bigger, tmp_path, build=True, max_batch=8)
    assert rebuilt.built and bigger.calls == 1 and rebuilt.path.read_bytes() == b"engine for 8"
    assert not engine_covering(key, EngineBuilds(8), tmp_path, build=False, max_batch=8).built
