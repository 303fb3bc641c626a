"""Building the two backends a MobileVLM runs on, their artifacts taken from (or built into) the artifact cache.

The artifacts come first, before any weights load: under the build policy "never" a missing one is an error at once
(not after the language model spent a minute loading), and a build (export, TensorRT, quantization) never shares
memory with the loaded LLM, which on an 8 GB Orin Nano does not fit beside it. Then the language backend decides
how much of the checkpoint torch loads: all of it for torch, only the vision path for llama.cpp, which runs its own
GGUF copy of the LLM; a vision backend other than torch runs its own compiled copy of the tower and projector, so
torch never reads theirs. Runtimes other than torch are imported only when chosen: each loads a native library.
"""

from pathlib import Path

import torch

from mobilevlm_ros.choices import GGML_MMPROJ_TYPES, engine_build_policy
from mobilevlm_ros.errors import ArtifactError, ConfigError
from mobilevlm_ros.export.artifacts import Artifact
from mobilevlm_ros.model.checkpoint import LoadedCheckpoint, load_checkpoint
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM
from mobilevlm_ros.runtime.language import LanguageBackend, TorchLanguageModel
from mobilevlm_ros.runtime.vision import OnnxRuntimeVision, TorchVision, VisionBackend


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_artifacts(
    path: Path, language: str, quant: str, vision: str, precision: str | None, engines_dir: str | Path | None,
    build: bool | str, engine_path: str | Path | None = None,
) -> tuple[Artifact | None, Artifact | None]:
    """(language artifact, vision artifact), before anything loads. Under the policy "never" every missing one is
    named in one ArtifactError, each with its `mobilevlm build` command, so one round of building fixes them all."""
    resolved, problems = [], []
    for resolve in (lambda: language_artifact(path, language, quant, engines_dir, build),
                    lambda: vision_artifact(path, vision, precision, engines_dir, build, engine_path)):
        try:
            resolved.append(resolve())
        except ArtifactError as error:
            if engine_build_policy(build) != "never":
                raise
            problems.append(str(error))
    if problems:
        raise ArtifactError("; ".join(problems))
    return resolved[0], resolved[1]


def language_artifact(path: str | Path, name: str, quant: str, engines_dir: str | Path | None, build: bool | str) -> Artifact | None:
    """The file the language backend `name` runs (the GGUF of type `quant` for llamacpp; None for torch), from the
    artifact cache, built first when missing or stale and the policy `build` (choices.ENGINE_BUILD) allows."""
    if name == "llamacpp":
        from mobilevlm_ros.export.gguf import llm_gguf_artifact

        return llm_gguf_artifact(path, quant, engines_dir, build)
    return None


def load_language(
    path: str | Path, name: str, device: torch.device, dtype: torch.dtype, artifact: Artifact | None, int8: bool,
    llama_amx: bool | None, with_vision: bool = True,
) -> tuple[LoadedCheckpoint, LanguageBackend]:
    """The checkpoint in `path` and the language backend `name` (choices.LANGUAGE_BACKENDS) for it: torch runs the
    loaded LLM (`int8`: weight-only int8); llamacpp runs the GGUF `artifact` (`llama_amx`: see ggml.amx_allowed).
    `with_vision=False`: the torch vision tower and projector are not loaded (a compiled vision backend runs them)."""
    if name == "torch":
        checkpoint = load_checkpoint(path, dtype=dtype, device=device, with_vision=with_vision)
        return checkpoint, TorchLanguageModel(checkpoint.model, checkpoint.config.context_length, int8=int8)
    if name == "llamacpp":
        from mobilevlm_ros.runtime.llamacpp import LlamaCppLanguageModel

        checkpoint = load_checkpoint(path, dtype=dtype, device=device, with_language_model=False, with_vision=with_vision)
        return checkpoint, LlamaCppLanguageModel(artifact.path, checkpoint.config.context_length, amx=llama_amx)
    raise AssertionError(f"language backend {name!r} is in choices.LANGUAGE_BACKENDS but not built here")


def vision_artifact(
    model_dir: Path, name: str, precision: str | None, engines_dir: str | Path | None, build: bool | str,
    engine_path: str | Path | None = None,
) -> Artifact | None:
    """The file the vision backend `name` runs in `precision` (choices.vision_precision): the ONNX graph, the TensorRT
    engine or the mmproj GGUF (None for torch), from the artifact cache or at `engine_path`, built first when missing
    or stale and the policy `build` (choices.ENGINE_BUILD) allows, from the checkpoint's vision weights alone."""
    if name == "torch":
        if engine_path is not None:
            raise ConfigError("an engine path names the file a compiled vision backend runs (onnxruntime, tensorrt, ggml); "
                              "the torch vision backend has none")
        return None
    engines = Path(engines_dir) if engines_dir is not None else None
    engine = Path(engine_path) if engine_path is not None else None
    if name == "onnxruntime":
        from mobilevlm_ros.export.onnx import onnx_artifact

        return onnx_artifact(None, model_dir, engines, build, precision=precision, path=engine)
    if name == "tensorrt":
        from mobilevlm_ros.tensorrt_support import tensorrt_unavailable_reason

        if reason := tensorrt_unavailable_reason():
            raise ConfigError(f"vision backend tensorrt cannot run here: {reason}")
        from mobilevlm_ros.export.tensorrt import engine_artifact

        return engine_artifact(None, model_dir, precision, engines, build, path=engine)
    if name == "ggml":
        from mobilevlm_ros.export.mmproj import mmproj_artifact

        return mmproj_artifact(model_dir, GGML_MMPROJ_TYPES[precision], engines, build, path=engine)
    raise AssertionError(f"vision backend {name!r} is in choices.VISION_BACKENDS but not built here")


def open_vision(name: str, artifact: Artifact | None, model: MobileLlamaForCausalLM, device: torch.device) -> VisionBackend:
    """The vision backend `name` on its `artifact` (vision_artifact), or, for torch, on the model's vision path."""
    if name == "torch":
        return TorchVision(model.vision_path)
    if name == "onnxruntime":
        return OnnxRuntimeVision(artifact.path, device)
    if name == "tensorrt":
        from mobilevlm_ros.runtime.tensorrt import TensorRTVision

        return TensorRTVision(artifact.path, device)
    if name == "ggml":
        from mobilevlm_ros.runtime.ggml_vision import GgmlVision

        return GgmlVision(artifact.path)
    raise AssertionError(f"vision backend {name!r} is in choices.VISION_BACKENDS but not built here")
