"""TensorRT engine build from the exported vision graph, with the Python builder API of TensorRT 8.5, 8.6 and 10.x.

fp16 is the default (CLIP's LayerNorm stays fp32 where the TensorRT version needs it), fp32 and int8 (entropy
calibration on sample images, preprocessed as at inference) are options. One optimization profile covers batch
1..max_batch (tiles), the workspace pool is capped (an 8 GB Orin Nano shares it with everything else) and a timing
cache makes rebuilds quick. The calibration data is prepared without TensorRT (`calibration_batches`).
"""

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from mobilevlm_ros.errors import ArtifactError, ConfigError
from mobilevlm_ros.export.artifacts import Artifact, ArtifactKey, get_or_build, model_fingerprint
from mobilevlm_ros.model.mobilevlm import VisionPath
from mobilevlm_ros.model.preprocess import ImageProcessor, load_image_file

logger = logging.getLogger(__name__)

# Substrings of the ONNX node names torch gives CLIP's LayerNorm modules ("/.../layer_norm1/ReduceMean", ...).
_LAYER_NORM_NAMES = ("layer_norm", "layernorm", "pre_layrnorm", "post_layernorm")
CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CALIBRATION_BATCH = 8


def calibration_batches(directory: Path, image_processor: ImageProcessor, batch_size: int = CALIBRATION_BATCH) -> list[torch.Tensor]:
    """The images in `directory` (sorted by name) through the inference preprocessing, as pixel_values batches
    [B, 3, S, S] with B = min(batch_size, number of images). TensorRT calibrates on one fixed shape, so the last batch
    is filled up with images from the start."""
    if not directory.is_dir():
        raise ConfigError(f"calibration directory {directory}: not a directory")
    paths = sorted(path for path in directory.iterdir() if path.suffix.lower() in CALIBRATION_SUFFIXES and path.is_file())
    if not paths:
        raise ConfigError(f"calibration directory {directory}: no images ({', '.join(CALIBRATION_SUFFIXES)})")
    batch_size = min(batch_size, len(paths))
    padded = paths + paths[: -len(paths) % batch_size]
    batches = [image_processor.batch([load_image_file(path) for path in padded[start : start + batch_size]])
               for start in range(0, len(padded), batch_size)]
    logger.info("calibration: %d images from %s in %d batches of %d", len(paths), directory, len(batches), batch_size)
    return batches


def calibration_fingerprint(batches: Sequence[torch.Tensor]) -> str:
    """sha256 of the calibration pixels: what an int8 engine's manifest records it was calibrated on."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


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
    calibration: Sequence[torch.Tensor] = (),
    input_name: str = "pixel_values",
) -> dict[str, object]:
    """Build and serialize an engine for `onnx_path`; returns what the artifact manifest records about the build.
    int8 needs `calibration`: pixel_values batches of one shape (`calibration_batches`)."""
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

    details: dict[str, object] = {"max_batch": max_batch, "workspace_bytes": workspace_bytes}
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        if trt_version() < (8, 6):
            details["layer_norms_pinned_fp32"] = _pin_layer_norms_to_fp32(network, config)
    if precision == "int8":
        if not calibration:
            raise ArtifactError("an int8 engine needs calibration images: build it with "
                                "`mobilevlm build --vision tensorrt --precision int8 --calibration-dir DIR`")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _entropy_calibrator(calibration)
        # Calibration runs at the kOPT shape of its profile, so that profile is the batches' one shape.
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(input_name, *[tuple(calibration[0].shape)] * 3)
        config.set_calibration_profile(calibration_profile)
        details |= {"calibration_images": sum(len(batch) for batch in calibration), "calibration_sha256": calibration_fingerprint(calibration)}

    cache = config.create_timing_cache(timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache_path is not None:
        timing_cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return details


def _pin_layer_norms_to_fp32(network: object, config: object) -> int:
    """Keep the decomposed LayerNorm layers in fp32 (fp16 overflows after attention in CLIP-L)."""
    import tensorrt as trt

    count = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        # Only float layers: a shape or index layer of the same module cannot be made fp32.
        if any(part in layer.name.lower() for part in _LAYER_NORM_NAMES) and all(t.dtype == trt.float32 for t in outputs):
            layer.precision = trt.float32
            for position in range(layer.num_outputs):
                layer.set_output_type(position, trt.float32)
            count += 1
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    logger.info("pinned %d LayerNorm layers to fp32 (TensorRT < 8.6)", count)
    return count


def _entropy_calibrator(batches: Sequence[torch.Tensor]) -> object:
    """A calibrator feeding the batches through one torch CUDA buffer (the batches stay in host memory)."""
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.buffer = torch.empty(batches[0].shape, dtype=torch.float32, device="cuda")
            self.position = 0

        def get_batch_size(self) -> int:
            return self.buffer.shape[0]

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.position == len(batches):
                return None
            self.buffer.copy_(batches[self.position])
            torch.cuda.synchronize()  # TensorRT reads the buffer on its own stream
            self.position += 1
            return [self.buffer.data_ptr()]  # the graph's one input

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

    return EntropyCalibrator()


def engine_artifact(
    vision: VisionPath, model_dir: Path, precision: str, engines_dir: Path | None, build: bool,
    max_batch: int = 8, workspace_bytes: int = 1 << 30, calibration: Sequence[torch.Tensor] = (),
) -> Artifact:
    """The vision engine for this GPU and TensorRT version from the artifact cache, built (from the cached ONNX graph)
    when missing or stale. An int8 engine records what it was calibrated on; a cached one is kept even when other
    `calibration` batches are given (logged): delete it to recalibrate."""
    import tensorrt as trt

    from mobilevlm_ros.export.onnx import onnx_artifact

    device = torch.device("cuda", torch.cuda.current_device())
    image_size = vision.image_size
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
        graph = onnx_artifact(vision, model_dir, engines_dir, build, opset=onnx_opset_for_tensorrt())
        timing_cache = graph.path.with_name(f"timing-{trt.__version__}-{key.device.replace(' ', '_').replace(':', '_')}.cache")
        return build_engine(graph.path, path, precision, image_size, max_batch, workspace_bytes, timing_cache, calibration)

    artifact = get_or_build(key, build_fn, engines_dir, build)
    recorded = artifact.manifest["details"].get("calibration_sha256")
    if calibration and not artifact.built and recorded != calibration_fingerprint(calibration):
        logger.warning("%s was calibrated on other images (%s); delete it to recalibrate", artifact.path, recorded)
    return artifact
