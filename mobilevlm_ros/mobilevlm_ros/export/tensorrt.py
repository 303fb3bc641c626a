"""TensorRT engine build from the exported vision graph, with the Python builder API of TensorRT 8.5, 8.6 and 10.x.

fp16 is the default (CLIP's LayerNorm stays fp32 where the TensorRT version needs it), fp32 and int8 (entropy
calibration from sample images) are options. One optimization profile covers batch 1..max_batch (tiles), the
workspace pool is capped (an 8 GB Orin Nano shares it with everything else) and a timing cache makes rebuilds quick.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from mobilevlm_ros.errors import ArtifactError
from mobilevlm_ros.export.artifacts import Artifact, ArtifactKey, get_or_build, model_fingerprint
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM

logger = logging.getLogger(__name__)

# Substrings of the ONNX node names torch gives CLIP's LayerNorm modules ("/.../layer_norm1/ReduceMean", ...).
_LAYER_NORM_NAMES = ("layer_norm", "layernorm", "pre_layrnorm", "post_layernorm")


def trt_version() -> tuple[int, int]:
    import tensorrt as trt

    major, minor = trt.__version__.split(".")[:2]
    return int(major), int(minor)


def onnx_opset_for_tensorrt() -> int:
    """TensorRT 8.5 cannot parse LayerNormalization (opset 17): give it the decomposed form and pin that to fp32."""
    return 16 if trt_version() < (8, 6) else 17


def gpu_description(device: torch.device) -> str:
    """What an engine is tied to besides the TensorRT version: the GPU model and its compute capability."""
    index = device.index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return f"cuda:{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    precision: str,
    image_size: int,
    max_batch: int = 8,
    workspace_bytes: int = 1 << 30,
    timing_cache_path: Path | None = None,
    calibration_images: Sequence[torch.Tensor] = (),
    input_name: str = "pixel_values",
) -> dict[str, object]:
    """Build and serialize an engine for `onnx_path`; returns what the artifact manifest records about the build."""
    import tensorrt as trt

    if precision not in ("fp16", "fp32", "int8"):
        raise ArtifactError(f"unknown TensorRT precision {precision!r} (expected fp16, fp32 or int8)")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # EXPLICIT_BATCH is required before TensorRT 10 and ignored (deprecated) from 10 on.
    flags = 0 if trt_version() >= (10, 0) else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape(input_name, (1, *shape), (1, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)

    pinned = 0
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        if trt_version() < (8, 6):
            pinned = _pin_layer_norms_to_fp32(network, config)
    if precision == "int8":
        if not calibration_images:
            raise ArtifactError("int8 needs calibration images (preprocessed pixel_values)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _entropy_calibrator(calibration_images)
        config.set_calibration_profile(profile)

    cache = config.create_timing_cache(timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache_path is not None:
        timing_cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"max_batch": max_batch, "workspace_bytes": workspace_bytes, "layer_norms_pinned_fp32": pinned}


def _pin_layer_norms_to_fp32(network: object, config: object) -> int:
    """Keep the decomposed LayerNorm layers in fp32 (fp16 overflows after attention in CLIP-L)."""
    import tensorrt as trt

    count = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if any(part in layer.name.lower() for part in _LAYER_NORM_NAMES):
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            count += 1
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    logger.info("pinned %d LayerNorm layers to fp32 (TensorRT < 8.6)", count)
    return count


def _entropy_calibrator(images: Sequence[torch.Tensor]) -> object:
    """A calibrator feeding preprocessed sample images one at a time from torch CUDA buffers."""
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = [image.unsqueeze(0).to("cuda", torch.float32).contiguous() for image in images]
            self.position = 0

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.position == len(self.batches):
                return None
            self.position += 1
            return [self.batches[self.position - 1].data_ptr()]

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

    return EntropyCalibrator()


def engine_artifact(
    model: MobileLlamaForCausalLM, model_dir: Path, precision: str, engines_dir: Path | None, build: bool,
    max_batch: int = 8, workspace_bytes: int = 1 << 30, calibration_images: Sequence[torch.Tensor] = (),
) -> Artifact:
    """The vision engine for this GPU and TensorRT version from the artifact cache, built (from the cached ONNX graph)
    when missing or stale."""
    import tensorrt as trt

    from mobilevlm_ros.export.onnx import onnx_artifact

    device = torch.device("cuda", torch.cuda.current_device())
    image_size = model.model.vision_tower.config.image_size
    key = ArtifactKey(
        model_hash=model_fingerprint(model_dir),
        component="vision",
        precision=f"trt-{precision}",
        runtime="tensorrt",
        runtime_version=trt.__version__,
        device=gpu_description(device),
        suffix="engine",
        extra={"max_batch": max_batch, "image_size": image_size, "workspace_bytes": workspace_bytes},
    )

    def build_fn(path: Path) -> dict[str, object]:
        graph = onnx_artifact(model, model_dir, engines_dir, build, opset=onnx_opset_for_tensorrt())
        timing_cache = graph.path.with_name(f"timing-{trt.__version__}-{key.device.replace(' ', '_').replace(':', '_')}.cache")
        return build_engine(graph.path, path, precision, image_size, max_batch, workspace_bytes, timing_cache, calibration_images)

    return get_or_build(key, build_fn, engines_dir, build)
