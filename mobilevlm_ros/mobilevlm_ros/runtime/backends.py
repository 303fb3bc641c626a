"""Building the two backends a MobileVLM runs on, their artifacts taken from (or built into) the artifact cache.

The language backend decides how much of the checkpoint torch loads: all of it for torch, only the vision path for
llama.cpp, which runs its own GGUF copy of the LLM. A vision backend other than torch replaces the torch tower and
projector, which are freed here once its graph or engine exists. Runtimes other than torch are imported only when
chosen: each loads a native library.
"""

import ctypes
from pathlib import Path

import torch

from mobilevlm_ros.choices import GGML_MMPROJ_TYPES
from mobilevlm_ros.errors import ConfigError
from mobilevlm_ros.model.checkpoint import LoadedCheckpoint, load_checkpoint
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM
from mobilevlm_ros.runtime.language import LanguageBackend, TorchLanguageModel
from mobilevlm_ros.runtime.vision import OnnxRuntimeVision, TorchVision, VisionBackend


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_language(
    path: str | Path, name: str, device: torch.device, dtype: torch.dtype, quant: str, engines_dir: str | Path | None,
    build: bool, int8: bool, llama_amx: bool | None,
) -> tuple[LoadedCheckpoint, LanguageBackend]:
    """The checkpoint in `path` and the language backend `name` (choices.LANGUAGE_BACKENDS) for it: torch runs the
    loaded LLM (`int8`: weight-only int8); llamacpp runs the GGUF of type `quant` (`llama_amx`: see ggml.amx_allowed)."""
    if name == "torch":
        checkpoint = load_checkpoint(path, dtype=dtype, device=device)
        return checkpoint, TorchLanguageModel(checkpoint.model, checkpoint.config.context_length, int8=int8)
    if name == "llamacpp":
        from mobilevlm_ros.export.gguf import llm_gguf_artifact
        from mobilevlm_ros.runtime.llamacpp import LlamaCppLanguageModel

        gguf = llm_gguf_artifact(path, quant, engines_dir, build).path
        checkpoint = load_checkpoint(path, dtype=dtype, device=device, with_language_model=False)
        return checkpoint, LlamaCppLanguageModel(gguf, checkpoint.config.context_length, amx=llama_amx)
    raise AssertionError(f"language backend {name!r} is in choices.LANGUAGE_BACKENDS but not built here")


def release_torch_vision(model: MobileLlamaForCausalLM) -> None:
    """Free the model's torch vision path once a graph, an engine or an mmproj does its work. glibc keeps freed heap
    memory for the process unless asked: without the trim the RSS stays 1.2 GB higher (1.7B dims)."""
    model.release_vision_path()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, or no way to ask
        pass


def load_vision(
    model: MobileLlamaForCausalLM, model_dir: Path, name: str, precision: str | None, device: torch.device,
    engines_dir: str | Path | None, build: bool,
) -> VisionBackend:
    """The vision backend `name` running `precision` (choices.vision_precision) for `model`, the checkpoint in
    `model_dir`; its graph or engine comes from the artifact cache, and then the model's torch vision path is freed."""
    if name == "torch":
        return TorchVision(model.vision_path)
    engines = Path(engines_dir) if engines_dir is not None else None
    if name == "onnxruntime":
        from mobilevlm_ros.export.onnx import onnx_artifact

        graph = onnx_artifact(model.vision_path, model_dir, engines, build, precision=precision).path
        release_torch_vision(model)
        return OnnxRuntimeVision(graph, device)
    if name == "tensorrt":
        from mobilevlm_ros.export.tensorrt import engine_artifact
        from mobilevlm_ros.runtime.tensorrt import TensorRTVision
        from mobilevlm_ros.tensorrt_support import tensorrt_unavailable_reason

        if reason := tensorrt_unavailable_reason():
            raise ConfigError(f"vision backend tensorrt cannot run here: {reason}")
        engine = engine_artifact(model.vision_path, model_dir, precision, engines, build).path
        release_torch_vision(model)
        return TensorRTVision(engine, device)
    if name == "ggml":
        from mobilevlm_ros.export.mmproj import mmproj_artifact
        from mobilevlm_ros.runtime.ggml_vision import GgmlVision

        mmproj = mmproj_artifact(model_dir, GGML_MMPROJ_TYPES[precision], engines, build, model=model).path
        release_torch_vision(model)
        return GgmlVision(mmproj)
    raise AssertionError(f"vision backend {name!r} is in choices.VISION_BACKENDS but not built here")
