"""TensorRT engine build from the exported vision graph, with the Python builder API of TensorRT 8.6, 10.x and 11.x.

How each precision is built depends on what the installed TensorRT has (`build_plan`; test_tensorrt_gating.py runs
the builder against the recorded bindings of 8.6, 10.3, 10.16, 11.0 and 11.1):

| precision | TensorRT 8.6 / 10.x (weakly typed) | TensorRT 11 (strongly typed only) |
|---|---|---|
| fp16 | fp32 graph + `BuilderFlag.FP16`; LayerNormalization computes in fp32 by default | the fp16 graph (export/onnx_fp16.py): fp16 everywhere, LayerNorm fp32 through casts |
| fp32 | fp32 graph, `BuilderFlag.TF32` cleared (TensorRT turns TF32 on by default) | the same |
| int8 | fp32 graph + FP16 + INT8 flags, entropy calibration on sample images | refused: 11 takes int8 only from Q/DQ graphs |

TensorRT 8.5 (JetPack 5) is not supported: this package needs Python 3.10 and transformers 5, JetPack 5 has Python 3.8.

One optimization profile covers batch 1..max_batch (tiles). The engine cache key holds what decides the engine's
numbers (model, precision, graph, TensorRT version, GPU, image size); the profile's largest batch and the workspace
limit are build settings, recorded in the manifest: an engine is used for any batch (a bigger one runs in chunks), and
a build that asks for a larger profile than the cached engine has rebuilds it. The timing cache is kept per TensorRT
version, GPU and precision and written atomically. The calibration data is prepared without TensorRT
(`calibration_batches`).
"""  # noqa: E501 (the table's rows cannot wrap)

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mobilevlm_ros.choices import engine_build_policy
from mobilevlm_ros.errors import ArtifactError, ConfigError
from mobilevlm_ros.export.artifacts import Artifact, ArtifactKey, build_command, get_or_build, model_fingerprint
from mobilevlm_ros.model.mobilevlm import VisionPath
from mobilevlm_ros.model.preprocess import ImageProcessor, load_image_file
from mobilevlm_ros.tensorrt_support import (
    MIN_TENSORRT,
    precision_support,
    strongly_typed_only,
    tensorrt_logger,
    tensorrt_version,
)

logger = logging.getLogger(__name__)

CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CALIBRATION_BATCH = 8
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_BYTES = 1 << 30
PRECISIONS = ("fp16", "fp32", "int8")


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


def gpu_description(device: torch.device) -> str:
    """What an engine is tied to besides the TensorRT version: the GPU model, its compute capability, SM count and
    memory (whole GiB). Jetson Orin modules share one name and sm_87; the SM count and memory tell AGX Orin (16 or 14
    SMs, 64 or 32 GB), Orin NX 16 GB, Orin Nano 8 GB and 4 GB apart, for which TensorRT picks tactics differently
    (Orin NX 8 GB and Orin Nano 8 GB, both 8 SMs and 8 GB, share a key). Clocks (power modes, "Super") are left out:
    an engine stays valid across them."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return (f"cuda:{properties.name} sm_{properties.major}{properties.minor} {properties.multi_processor_count} SMs "
            f"{round(properties.total_memory / 2**30)} GiB")


@dataclass(frozen=True)
class BuildPlan:
    """How this TensorRT builds `precision`: from which graph, with which builder flags."""

    precision: str
    graph: str  # the ONNX graph it is built from: "fp32" or "fp16" (export/onnx_fp16.py)
    strongly_typed: bool  # every tensor's type comes from the graph (TensorRT 11: always)
    flags: tuple[str, ...]  # BuilderFlag members set
    tf32: bool  # whether fp32 layers may run as TF32

    @property
    def key_fields(self) -> dict[str, Any]:
        """What of the plan goes into the engine's cache key."""
        return {"graph": self.graph, "network": "strongly typed" if self.strongly_typed else "weakly typed",
                "flags": list(self.flags), "tf32": self.tf32}


def build_plan(trt: ModuleType, precision: str) -> BuildPlan:
    """The plan for `precision` on this TensorRT; ArtifactError for a precision it cannot build."""
    if precision not in PRECISIONS:
        raise ArtifactError(f"unknown TensorRT precision {precision!r} (expected {', '.join(PRECISIONS)})")
    if tensorrt_version(trt) < MIN_TENSORRT:
        raise ArtifactError(f"TensorRT {trt.__version__} is not supported: this package needs TensorRT 8.6 or later (JetPack 6 or later)")
    if reason := precision_support(trt)[precision]:
        raise ArtifactError(f"cannot build an engine in {precision}: {reason}")
    tf32 = precision != "fp32"  # "fp32" means fp32: TensorRT's default TF32 is cleared
    if strongly_typed_only(trt):
        return BuildPlan(precision, "fp16" if precision == "fp16" else "fp32", True, (), tf32)
    flags = {"fp16": ("FP16",), "fp32": (), "int8": ("FP16", "INT8")}[precision]
    return BuildPlan(precision, "fp32", False, flags, tf32)


def timing_cache_path(directory: Path, trt_version: str, device: str, precision: str) -> Path:
    """One timing cache per TensorRT version, GPU and precision (tactics timed for one do not describe another)."""
    slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in device)
    return directory / f"timing-trt{trt_version}-{slug}-{precision}.cache"


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path` and rename it into place: a reader or a concurrent build never
    sees a half-written file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    precision: str,
    image_size: int,
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    timing_cache_path: Path | None = None,
    calibration: Sequence[torch.Tensor] = (),
    input_name: str = "pixel_values",
    device: torch.device | None = None,
) -> dict[str, object]:
    """Build and serialize an engine for `onnx_path` (the graph `build_plan(trt, precision).graph` names); returns what
    the artifact manifest records about the build. int8 needs `calibration`: pixel_values batches of one shape
    (`calibration_batches`), fed through a buffer on `device` (default: the current CUDA device)."""
    import tensorrt as trt

    plan = build_plan(trt, precision)
    if precision == "int8" and not calibration:
        raise ArtifactError("an int8 engine needs calibration images: build it with "
                            "`mobilevlm build --vision tensorrt --precision int8 --calibration-dir DIR`")
    trt_logger = tensorrt_logger(trt)
    builder = trt.Builder(trt_logger)
    # EXPLICIT_BATCH is required before TensorRT 10, deprecated in 10 and gone in 11 (networks are explicit batch);
    # STRONGLY_TYPED is deprecated and ignored in 11, where every network is strongly typed.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if tensorrt_version(trt) < (10, 0) else 0
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
    if not plan.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))

    details: dict[str, object] = {"max_batch": max_batch, "workspace_bytes": workspace_bytes,
                                  "tensorrt": trt.__version__, **plan.key_fields}
    calibrator = None
    if precision == "int8":
        calibrator = _entropy_calibrator(trt, calibration, device or torch.device("cuda", torch.cuda.current_device()))
        config.int8_calibrator = calibrator
        # Calibration runs at the kOPT shape of its profile, so that profile is the batches' one shape.
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(input_name, *[tuple(calibration[0].shape)] * 3)
        config.set_calibration_profile(calibration_profile)
        details |= {"calibration_images": sum(len(batch) for batch in calibration),
                    "calibration_sha256": calibration_fingerprint(calibration)}

    cache = _load_timing_cache(config, timing_cache_path)
    config.set_timing_cache(cache, False)  # False: a cache for another device is refused, not half-used
    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.error is not None:
        # TensorRT calls get_batch from C++ and does not see a Python exception: it was kept, and surfaces here.
        raise ArtifactError(f"int8 calibration failed: {calibrator.error}") from calibrator.error
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache_path is not None:
        write_atomically(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    return details


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    """The timing cache from `path`, or an empty one when there is none or it does not load (logged)."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        return config.create_timing_cache(data)
    except Exception as error:  # a truncated or foreign cache: TensorRT raises its own types
        logger.warning("timing cache %s does not load (%s); starting an empty one", path, error)
        return config.create_timing_cache(b"")


def _entropy_calibrator(trt: ModuleType, batches: Sequence[torch.Tensor], device: torch.device) -> Any:
    """A calibrator feeding the batches through one torch buffer on `device` (the batches stay in host memory).

    TensorRT calls `get_batch` from C++ and ignores a Python exception raised there (calibration just ends, or the
    build fails with a vague message): the first one is kept in `error` and build_engine raises it after the build."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.buffer = torch.empty(batches[0].shape, dtype=torch.float32, device=device)
            self.position = 0
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            return self.buffer.shape[0]

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.error is not None or self.position == len(batches):
                return None
            try:
                self.buffer.copy_(batches[self.position])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # TensorRT reads the buffer on its own stream
            except BaseException as error:  # noqa: BLE001 (kept and re-raised by build_engine)
                self.error = error
                return None
            self.position += 1
            return [self.buffer.data_ptr()]  # the graph's one input

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

    return EntropyCalibrator()


def engine_key(model_hash: str, precision: str, image_size: int, trt_version: str, device: str, plan: BuildPlan) -> ArtifactKey:
    """The engine's cache key: what decides its numbers. Build settings (profile size, workspace) are not in it."""
    return ArtifactKey(
        model_hash=model_hash, component="vision", precision=f"trt-{precision}", runtime="tensorrt",
        runtime_version=trt_version, device=device, suffix="engine", extra={"image_size": image_size, **plan.key_fields},
    )


def engine_covering(key: ArtifactKey, build_fn: Callable[[Path], dict[str, object]], engines_dir: Path | None, build: bool | str,
                    max_batch: int | None, path: Path | None = None, command: str | None = None) -> Artifact:
    """The cached engine for `key` when its profile covers `max_batch` (None: any profile does, as for the runtime,
    which runs a larger batch in chunks); else a new one built by `build_fn` (`build`: the policy, see get_or_build)."""
    artifact = get_or_build(key, build_fn, engines_dir, build, path, command)
    covered = int(artifact.manifest.get("details", {}).get("max_batch", 0))
    if artifact.built or max_batch is None or covered >= max_batch:
        return artifact
    if engine_build_policy(build) == "never":
        raise ArtifactError(f"{artifact.path}: its profile takes batches up to {covered}, not {max_batch}, "
                            f"and building is disabled (build it first, e.g. with `mobilevlm build --max-batch {max_batch}`)")
    logger.info("%s takes batches up to %d; rebuilding it for %d", artifact.path, covered, max_batch)
    # Without its manifest the artifact is "not built yet": get_or_build rebuilds it under its lock.
    artifact.path.with_name(artifact.path.name + ".json").unlink(missing_ok=True)
    return get_or_build(key, build_fn, engines_dir, build, artifact.path, command)


def engine_artifact(
    vision: VisionPath | None, model_dir: Path, precision: str, engines_dir: Path | None, build: bool | str,
    max_batch: int | None = None, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, calibration: Sequence[torch.Tensor] = (),
    path: Path | None = None,
) -> Artifact:
    """The vision engine for this GPU and TensorRT version from the artifact cache (or at `path`), built (from the
    cached ONNX graph `build_plan` names) when missing or stale and `build` (the policy, see get_or_build) allows.
    `vision` is the loaded vision path to export the graph from; None reads it from `model_dir` when a graph must be
    exported. `max_batch`: the profile's largest batch a build asks for (a cached engine with a smaller profile is
    rebuilt); None, as the runtime passes, takes any cached engine and builds with DEFAULT_MAX_BATCH. An int8 engine
    records what it was calibrated on; a cached one is kept even when other `calibration` batches are given (logged):
    delete it to recalibrate."""
    import tensorrt as trt

    from mobilevlm_ros.export.onnx import onnx_artifact
    from mobilevlm_ros.export.onnx_fp16 import fp16_onnx_artifact
    from mobilevlm_ros.model.checkpoint import vision_tower_config

    plan = build_plan(trt, precision)
    device = torch.device("cuda", torch.cuda.current_device())
    image_size = vision.image_size if vision is not None else vision_tower_config(model_dir).image_size
    key = engine_key(model_fingerprint(model_dir), precision, image_size, trt.__version__, gpu_description(device), plan)
    command = build_command(model_dir, ["--vision", "tensorrt", "--precision", precision], engines_dir, path)
    if precision == "int8":
        command += " --calibration-dir DIR"

    def build_fn(target: Path) -> dict[str, object]:
        make_graph = fp16_onnx_artifact if plan.graph == "fp16" else onnx_artifact
        graph = make_graph(vision, model_dir, engines_dir, "if_missing")  # the graph is reused while it is valid
        timing_cache = timing_cache_path(graph.path.parent, trt.__version__, key.device, precision)
        return build_engine(graph.path, target, precision, image_size, max_batch or DEFAULT_MAX_BATCH, workspace_bytes,
                            timing_cache, calibration, device=device)

    artifact = engine_covering(key, build_fn, engines_dir, build, max_batch, path, command)
    recorded = artifact.manifest["details"].get("calibration_sha256")
    if calibration and not artifact.built and recorded != calibration_fingerprint(calibration):
        logger.warning("%s was calibrated on other images (%s); delete it to recalibrate", artifact.path, recorded)
    return artifact
