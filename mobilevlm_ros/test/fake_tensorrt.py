"""A stand-in `tensorrt` module made from one release's entry in tensorrt_api.json.

It has exactly the names that release's Python bindings define for the classes and enums our builder and runtime touch:
anything else raises AttributeError, as the real bindings do. It records every call, and behaves just enough for
build_engine and the runtime helpers to run (parse succeeds, a build returns bytes, an engine has one input and one
output, the int8 calibrator is driven the way TensorRT drives it, swallowing its Python exceptions).

This checks OUR version gating against what each release has, not TensorRT itself; the real engine tests in
test_onnx.py run wherever TensorRT imports.
"""

import enum
import json
import types
from pathlib import Path
from typing import Any

API = json.loads((Path(__file__).parent / "tensorrt_api.json").read_text(encoding="utf-8"))["versions"]
ENUMS = ("BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType", "TensorIOMode", "DataType")
SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")
DTYPE_ALIASES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8", "int32": "INT32", "int64": "INT64"}
# Members read as attributes (pybind properties); every other member is a method.
PROPERTIES = {"OnnxParser.num_errors", "ICudaEngine.num_io_tensors", "IBuilderConfig.int8_calibrator"}


class Stub:
    """An object of TensorRT class `cls`: only the recorded members exist; calls are recorded and answered by the
    fake's behaviour table."""

    def __init__(self, fake: "FakeTensorRT", cls: str, **state: Any):
        object.__setattr__(self, "_fake", fake)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "state", state)

    def _check(self, name: str) -> str:
        if name not in self._fake.members(self._cls):
            raise AttributeError(f"TensorRT {self._fake.label}: '{self._cls}' object has no attribute '{name}'")
        return f"{self._cls}.{name}"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        qualified = self._check(name)
        behaviour = getattr(self._fake, "on_" + qualified.replace(".", "_"), None)
        if qualified in PROPERTIES:
            self._fake.calls.append((qualified, ()))
            return behaviour(self) if behaviour else self.state.get(name)

        def method(*args: Any) -> Any:
            self._fake.calls.append((qualified, args))
            return behaviour(self, *args) if behaviour else None

        return method

    def __setattr__(self, name: str, value: Any) -> None:
        self._fake.calls.append((self._check(name) + "=", (value,)))
        self.state[name] = value


class FakeTensorRT(types.ModuleType):
    """`import tensorrt` as release `label` of tensorrt_api.json would answer it (see the module docstring)."""

    def __init__(self, label: str, version: str | None = None):
        super().__init__("tensorrt")
        self.label = label
        self.api = API[label]
        self.calls: list[tuple[str, tuple]] = []
        self.loggers = 0
        self.fail_build = False
        self.__dict__["__version__"] = version or self.api["version"]
        for name in ENUMS:
            self.__dict__[name] = enum.IntEnum(name, self.api["classes"][name]["members"], start=0)
        for alias, member in DTYPE_ALIASES.items():
            if alias in self.api["module"]:
                self.__dict__[alias] = getattr(self.DataType, member)
        fake = self

        class Logger:
            def __init__(self, severity: int = 2) -> None:
                fake.loggers += 1
                fake.calls.append(("Logger", (severity,)))

        for value, severity in enumerate(SEVERITIES):
            setattr(Logger, severity, value)
        self.__dict__["Logger"] = Logger
        if "IInt8EntropyCalibrator2" in self.api["module"]:
            class IInt8EntropyCalibrator2:  # the pybind trampoline's Python side: subclassed by our calibrator
                def __init__(self) -> None:
                    fake.calls.append(("IInt8EntropyCalibrator2", ()))

            self.__dict__["IInt8EntropyCalibrator2"] = IInt8EntropyCalibrator2
        for cls in ("Builder", "OnnxParser", "Runtime"):
            self.__dict__[cls] = lambda *args, _cls=cls: self._construct(_cls, args)

    def __getattr__(self, name: str) -> Any:
        if name in self.api["module"]:
            raise NotImplementedError(f"fake_tensorrt does not model tensorrt.{name} yet (TensorRT {self.label} has it)")
        raise AttributeError(f"module 'tensorrt' ({self.label}) has no attribute '{name}'")

    def members(self, cls: str) -> list[str]:
        return self.api["classes"][cls]["members"]

    def _construct(self, cls: str, args: tuple) -> Stub:
        self.calls.append((cls, args))
        return Stub(self, cls)

    def called(self, name: str) -> list[tuple]:
        """The arguments of every call of `name` ("IBuilderConfig.set_flag", ...), in order."""
        return [args for qualified, args in self.calls if qualified == name]

    # --- behaviour: just enough for build_engine and the runtime helpers ---
    def on_Builder_create_network(self, stub: Stub, flags: int = 0) -> Stub:
        return Stub(self, "INetworkDefinition", flags=flags)

    def on_Builder_create_builder_config(self, stub: Stub) -> Stub:
        return Stub(self, "IBuilderConfig")

    def on_Builder_create_optimization_profile(self, stub: Stub) -> Stub:
        return Stub(self, "IOptimizationProfile")

    def on_Builder_build_serialized_network(self, stub: Stub, network: Stub, config: Stub) -> bytes | None:
        calibrator = config.state.get("int8_calibrator")
        if calibrator is not None:  # TensorRT drives the calibrator from C++ and swallows its Python exceptions
            calibrator.get_batch_size()
            while True:
                try:
                    if calibrator.get_batch(["pixel_values"]) is None:
                        break
                except Exception:  # noqa: BLE001 (what TensorRT does: log and stop calibrating)
                    break
        return None if self.fail_build else b"serialized engine"

    def on_OnnxParser_parse_from_file(self, stub: Stub, path: str) -> bool:
        return Path(path).is_file()

    def on_OnnxParser_num_errors(self, stub: Stub) -> int:
        return 0

    def on_IBuilderConfig_create_timing_cache(self, stub: Stub, data: bytes) -> Stub:
        if data.startswith(b"garbage"):
            raise RuntimeError("timing cache: invalid serialized data")
        stub.state["timing_cache"] = Stub(self, "ITimingCache", data=data)
        return stub.state["timing_cache"]

    def on_IBuilderConfig_set_timing_cache(self, stub: Stub, cache: Stub, ignore_mismatch: bool) -> bool:
        return True

    def on_IBuilderConfig_get_timing_cache(self, stub: Stub) -> Stub:
        return stub.state["timing_cache"]

    def on_ITimingCache_serialize(self, stub: Stub) -> bytes:
        return stub.state["data"] + b"+timed"

    def on_Runtime_deserialize_cuda_engine(self, stub: Stub, data: bytes) -> Stub:
        return Stub(self, "ICudaEngine")

    def on_ICudaEngine_num_io_tensors(self, stub: Stub) -> int:
        return 2

    def on_ICudaEngine_get_tensor_name(self, stub: Stub, index: int) -> str:
        return ("pixel_values", "image_embeds")[index]

    def on_ICudaEngine_get_tensor_mode(self, stub: Stub, name: str) -> Any:
        return self.TensorIOMode.INPUT if name == "pixel_values" else self.TensorIOMode.OUTPUT

    def on_ICudaEngine_get_tensor_dtype(self, stub: Stub, name: str) -> Any:
        return self.float32

    def on_ICudaEngine_get_tensor_profile_shape(self, stub: Stub, name: str, profile: int) -> tuple:
        return (1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336)

    def on_ICudaEngine_create_execution_context(self, stub: Stub) -> Stub:
        return Stub(self, "IExecutionContext")

    def on_IExecutionContext_set_input_shape(self, stub: Stub, name: str, shape: tuple) -> bool:
        stub.state["batch"] = shape[0]
        return 1 <= shape[0] <= 4

    def on_IExecutionContext_get_tensor_shape(self, stub: Stub, name: str) -> tuple:
        return (stub.state["batch"], 144, 2048)

    def on_IExecutionContext_execute_async_v3(self, stub: Stub, stream_handle: int) -> bool:
        return True
