"""`mobilevlm doctor`: which backends can run here, and why not when they cannot."""

import importlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass

import torch

from mobilevlm_ros.cpu import cpu_info
from mobilevlm_ros.tensorrt_support import describe_precisions, tensorrt_unavailable_reason


@dataclass(frozen=True)
class Check:
    component: str
    usable: bool
    detail: str


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _importable(module: str) -> str | None:
    """None when `module` imports, else the reason it does not."""
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken native library raises more than ImportError
        return f"{type(error).__name__}: {error}"
    return None


def _tensorrt_check(gpu: str) -> Check:
    """TensorRT's version as its bindings report it (`tensorrt.__version__`: package metadata names another
    distribution for tensorrt-cu12 wheels and JetPack's apt bindings), what it builds, and why it cannot run if not."""
    if problem := _importable("tensorrt"):
        return Check("tensorrt (vision)", False, problem)
    import tensorrt

    reason = tensorrt_unavailable_reason()
    try:
        builds = describe_precisions(tensorrt)
    except Exception as error:  # bindings too old or too odd to describe: say so rather than fail the doctor
        builds = f"cannot tell what it builds ({type(error).__name__}: {error})"
    detail = f"{tensorrt.__version__}; {builds}; {gpu}"
    return Check("tensorrt (vision)", reason is None, f"{reason} (TensorRT {detail})" if reason else detail)


def checks() -> list[Check]:
    """Every backend and runtime the library can use, probed without loading a model."""
    cuda = torch.cuda.is_available()
    gpu = f"{torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})" if cuda else "no CUDA GPU"
    cpu = cpu_info()
    results = [
        Check("python", True, f"{platform.python_version()} on {platform.machine()}"),
        Check("cpu", True, cpu.describe()),
        Check("torch (vision, language)", True, f"{torch.__version__}; {gpu}"),
    ]

    if problem := _importable("onnxruntime"):
        results.append(Check("onnxruntime (vision)", False, problem))
    else:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
        results.append(Check("onnxruntime (vision)", True, f"{onnxruntime.__version__}; providers {providers}"))

    results.append(_tensorrt_check(gpu))

    if problem := _importable("llama_cpp"):
        results.append(Check("llamacpp (language)", False, problem))
    else:
        import llama_cpp

        from mobilevlm_ros.ggml import AMX_BUFFER_TYPE, extra_buffer_types, gpu_devices, offered_buffer_types

        gpus = gpu_devices() if llama_cpp.llama_supports_gpu_offload() else []
        if gpus:
            offload = f"GPU backend: {', '.join(gpus)} (layers offloaded, flash attention auto)"
        else:
            offload = "no GPU backend: a CPU-only build, the LLM runs on the CPU cores"
            if cuda:
                offload += " although a CUDA GPU is here (README: llama.cpp on a Jetson, to build it with CUDA)"
        used = offered_buffer_types()
        buffers = f"CPU weight buffers {', '.join(used) or 'plain CPU only'}"
        if used != extra_buffer_types().names:
            buffers += f" ({AMX_BUFFER_TYPE} left out by default on this CPU: --llama-amx on to use it)"
        results.append(Check("llamacpp (language)", True, f"llama-cpp-python {llama_cpp.__version__}; {offload}; {buffers}"))
        mtmd = _importable("llama_cpp.mtmd_cpp")
        where = f"on {', '.join(gpus)}" if gpus else "on the CPU (a CPU-only build)"
        results.append(Check("ggml (vision)", mtmd is None,
                             mtmd or f"llama.cpp's mtmd (libmtmd) {where}; no extra CPU buffer types (the AMX setting does not apply)"))

    ros = _importable("rclpy") or _importable("mobilevlm_interfaces.srv")
    distro = os.environ.get("ROS_DISTRO", "ROS 2 from PyPI wheels")
    results.append(Check("ROS 2 node", ros is None, ros or f"rclpy {_version('ros-rclpy')} ({distro}); mobilevlm_interfaces built"))
    return results
