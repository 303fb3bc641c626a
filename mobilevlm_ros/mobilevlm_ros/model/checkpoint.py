"""Load an official MobileVLM checkpoint directory: config, weights, vision tower, tokenizer, image processor.

Weights are read from safetensors or from `pytorch_model*.bin` with `torch.load(weights_only=True)`, single files or
shards listed by an index; nothing in the directory is ever executed. Loading is strict: every parameter of the
model must come from the files with the right shape, and every tensor in the files must have a place in the model.

Weights go straight to the target device in the target dtype, one tensor at a time: the model is built with its
parameters on the meta device (no memory; its buffers, computed at construction and not stored in the files, such
as the rotary `inv_freq` and CLIP's `position_ids`, are made for real), and the tensors read are assigned to it. So
no second copy exists at any point: no CPU copy beside a CUDA one (on a Jetson, whose CPU and GPU share one DRAM,
that doubled the peak), and no copy in the file's dtype beside the cast one.

Where the vision tower's weights come from follows upstream: MobileVLM V2 (`'v2' in mm_projector_type`) uses the copy
stored in the checkpoint; v1 reloads CLIP from `mm_vision_tower` and ignores the stored copy.
"""

import json
import logging
import pickle
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import CLIPVisionConfig
from transformers.initialization import no_init_weights

from mobilevlm_ros.errors import CheckpointError, ConfigError
from mobilevlm_ros.model.config import MobileVLMConfig, load_config
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM, VisionPath
from mobilevlm_ros.model.preprocess import ImageProcessor
from mobilevlm_ros.model.prompt import Tokenizer, load_tokenizer
from mobilevlm_ros.model.vision import CLIP_VIT_L_14_336

logger = logging.getLogger(__name__)

VISION_TOWER_PREFIX = "model.vision_tower.vision_tower."
VISION_PREFIXES = ("model.vision_tower.", "model.mm_projector.")

# The tower's architecture when `mm_vision_tower` names a hub model that is not on disk. Only the settings are
# known here; the weights must then be stored in the checkpoint (as official checkpoints do).
KNOWN_VISION_TOWERS = {"openai/clip-vit-large-patch14-336": CLIP_VIT_L_14_336}

# (index file, single file) per format, in order of preference.
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass
class LoadedCheckpoint:
    model: MobileLlamaForCausalLM
    tokenizer: Tokenizer
    image_processor: ImageProcessor
    config: MobileVLMConfig


def load_checkpoint(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", with_language_model: bool = True,
    with_vision: bool = True,
) -> LoadedCheckpoint:
    """Everything needed to run the checkpoint in `model_dir`, in `dtype` on `device`.

    `with_language_model=False` loads only the vision tower and projector, for a language backend that has its own
    copy of the LLM (a GGUF): the LLM's weights are never read and its parameters stay on the meta device.
    `with_vision=False` leaves the vision tower and projector out, for a vision backend that runs its own compiled copy
    (an ONNX graph, a TensorRT engine, an mmproj): their weights are never read and the model has no `vision_path`.
    The image processor comes with either.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a directory")
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    keep = _keep(with_language_model, with_vision)
    device = torch.device(device)
    tower_dir = resolve_vision_tower_dir(config.mm_vision_tower, model_dir)
    vision_config = load_vision_config(config, tower_dir)
    read_keep = keep
    if with_vision and not config.is_v2 and tower_dir is not None and has_weights(tower_dir):
        # v1 takes the tower from `mm_vision_tower`: a copy stored in the checkpoint is never read
        logger.info("v1 checkpoint: vision tower weights from %s (as upstream; any copy stored in the checkpoint is ignored)",
                    tower_dir)
        read_keep = lambda key: not key.startswith(VISION_TOWER_PREFIX) and (keep is None or keep(key))  # noqa: E731
    weights, sources = read_weights(model_dir, read_keep, dtype, device)
    if with_vision:
        _take_vision_tower(weights, sources, config, model_dir, tower_dir, dtype, device)

    with parameters_on_meta(), no_init_weights():
        model = MobileLlamaForCausalLM(config, vision_config)
    check_state_dict(model, weights, sources, model_dir, keep)
    model.load_state_dict(weights, assign=True, strict=keep is None)
    del weights
    if not with_vision:
        model.release_vision_path()
    # The parameters are on the device already; the buffers made at construction follow them. Without the language
    # model its parameters stay on the meta device (a GGUF runs it), and only the vision path moves.
    if with_language_model:
        model.to(device)
    elif with_vision:
        model.vision_path.to(device)
    model.eval()

    image_processor = ImageProcessor.from_tower_dir(tower_dir, vision_config.image_size, config.image_aspect_ratio == "pad")
    return LoadedCheckpoint(model, tokenizer, image_processor, config)


def _keep(with_language_model: bool, with_vision: bool) -> Callable[[str], bool] | None:
    """Which checkpoint keys to read (None: all)."""
    if with_language_model and with_vision:
        return None
    if with_vision:
        return is_vision_key
    if with_language_model:
        return lambda key: not is_vision_key(key)
    return lambda key: False


def _take_vision_tower(
    weights: dict[str, torch.Tensor], sources: dict[str, str], config: MobileVLMConfig, model_dir: Path, tower_dir: Path | None,
    dtype: torch.dtype, device: torch.device,
) -> None:
    """Make `weights` hold the vision tower upstream would load: for V2 the copy stored in the checkpoint; for v1 the
    CLIP of `mm_vision_tower` (the stored copy is dropped), or the stored copy when that directory is not on disk."""
    stored = [key for key in weights if key.startswith(VISION_TOWER_PREFIX)]  # none for v1 with a tower directory
    tower_dir_has_weights = tower_dir is not None and has_weights(tower_dir)
    if tower_dir_has_weights and not (stored and config.is_v2):
        tower_weights, tower_sources = read_weights(tower_dir, lambda key: key.startswith("vision_model."), dtype, device)
        for key, tensor in clip_vision_weights(tower_weights, tower_dir).items():
            weights[VISION_TOWER_PREFIX + key] = tensor
            sources[VISION_TOWER_PREFIX + key] = str(tower_dir / tower_sources[key])
    elif not stored:
        where = f"{tower_dir} has no weights" if tower_dir else f"{config.mm_vision_tower!r} is not a local directory"
        raise CheckpointError(f"{model_dir}: no vision tower weights: none stored in the checkpoint and {where}")
    elif not config.is_v2 and tower_dir is None:
        logger.warning("v1 checkpoint: %r is not on disk; using the vision tower weights stored in the checkpoint", config.mm_vision_tower)


def load_vision_path(model_dir: str | Path) -> VisionPath:
    """The checkpoint's vision tower + projector alone, in fp32 on the CPU: what ONNX export and mmproj writing read
    when no loaded model is at hand (building an artifact before the language model loads)."""
    return load_checkpoint(model_dir, with_language_model=False).model.vision_path


def vision_tower_config(model_dir: str | Path) -> CLIPVisionConfig:
    """The vision tower's config (image size, width) from the checkpoint's files, without reading any weights."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    return load_vision_config(config, resolve_vision_tower_dir(config.mm_vision_tower, model_dir))


def is_vision_key(key: str) -> bool:
    return key.startswith(VISION_PREFIXES)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (shapes only, no memory) and their buffers for
    real: buffers are computed at construction (rotary `inv_freq`, CLIP's `position_ids`), not read from the files,
    and they are small. (Building under `torch.device("meta")` would put those buffers on the meta device too.)"""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        if parameter is not None and not parameter.is_meta:
            parameter = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
        register(module, name, parameter)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_weights(
    model_dir: Path, keep: Callable[[str], bool] | None = None, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a checkpoint directory (those whose names `keep` accepts; floating ones cast to `dtype`), on
    `device`, and the file each came from (named in errors)."""
    for index_name, single_name in _WEIGHT_LAYOUTS:
        if (model_dir / index_name).is_file():
            return _read_sharded(model_dir / index_name, keep, dtype, device)
        if (model_dir / single_name).is_file():
            tensors = read_weight_file(model_dir / single_name, keep, dtype, device)
            return tensors, dict.fromkeys(tensors, single_name)
    raise CheckpointError(f"{model_dir}: no weights (expected model.safetensors or pytorch_model.bin, single or with an index)")


def has_weights(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for layout in _WEIGHT_LAYOUTS for name in layout)


def _read_sharded(
    index_path: Path, keep: Callable[[str], bool] | None, dtype: torch.dtype | None, device: str | torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: not a valid shard index ({error})") from error
    tensors, sources = {}, {}
    for shard in sorted(set(weight_map.values())):
        listed = {key for key, file in weight_map.items() if file == shard and (keep is None or keep(key))}
        if not listed:
            continue
        shard_tensors = read_weight_file(index_path.parent / shard, keep, dtype, device)
        if missing := sorted(listed - shard_tensors.keys()):
            raise CheckpointError(f"{index_path.parent / shard}: missing tensors the index lists: {_short_list(missing)}")
        if unlisted := sorted(shard_tensors.keys() - listed):
            raise CheckpointError(f"{index_path.parent / shard}: tensors the index does not list: {_short_list(unlisted)}")
        tensors.update(shard_tensors)
        sources.update(dict.fromkeys(shard_tensors, shard))
    return tensors, sources


def read_weight_file(
    path: Path, keep: Callable[[str], bool] | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """One safetensors or torch file, its tensors on `device`; a pickle may hold only tensors (`weights_only=True`
    refuses anything else).

    With `keep`, only the accepted tensors are read. Tensors are read, moved and cast one at a time, so the peak
    memory is what is kept plus one tensor (a 1.7B fp16 checkpoint loaded as fp32: 6.7 GB peak instead of 9.9; on
    CUDA, the host holds one tensor at a time). A safetensors file is reopened for each tensor because its mapped
    pages stay resident while it is open. A torch file is one pickle: it is read whole (or mapped) and each tensor's
    source is dropped once the tensor is placed. Parameters never point into a mapped file: a checkpoint overwritten
    in place while the model runs can neither change them nor fault.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    device = torch.device(device)

    def place(tensor: torch.Tensor, mapped: bool) -> torch.Tensor:
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        placed = tensor.to(device=device, dtype=cast)
        if mapped and placed.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            placed = placed.clone()  # still the file's pages: copy them out
        return placed

    if path.suffix == ".safetensors":
        with _reading(path):
            with safe_open(path, framework="pt") as handle:
                names = [key for key in handle.keys() if keep is None or keep(key)]
        tensors = {}
        for key in names:
            with _reading(path), safe_open(path, framework="pt") as handle:  # reopened: closing unmaps the pages just read
                tensor = handle.get_tensor(key)  # a host copy of one tensor (what safetensors' own device= makes too)
            tensors[key] = place(tensor, mapped=False)
        return tensors
    # torch maps only its zip format. Mapped, the tensors left out are never read and, on CUDA, the host holds file
    # pages (which the kernel can drop) rather than a copy; for a whole load on the CPU a read is one copy, freed as
    # the tensors are placed.
    mapped = zipfile.is_zipfile(path) and (keep is not None or device.type != "cpu")
    with _reading(path):
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise CheckpointError(f"{path}: expected a flat mapping of names to tensors")
    tensors = {}
    for key in list(loaded):
        tensor = loaded.pop(key)  # dropped as soon as it is placed: the file's copy and ours overlap by one tensor
        if keep is None or keep(key):
            tensors[key] = place(tensor, mapped)
    return tensors


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors of the file's reader as a CheckpointError naming the file (placing a tensor is outside: a CUDA
    out-of-memory is not a corrupt file)."""
    try:
        yield
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: unreadable or corrupt weight file ({type(error).__name__}: {error})") from error


def check_state_dict(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], sources: dict[str, str], model_dir: Path,
    keep: Callable[[str], bool] | None = None,
) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor (among those `keep` accepts)."""
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items() if keep is None or keep(key)}
    problems = []
    if missing := sorted(expected.keys() - weights.keys()):
        problems.append(f"missing: {_short_list(missing)}")
    if unexpected := sorted(weights.keys() - expected.keys()):
        problems.append(f"unexpected: {_short_list([f'{key} (in {sources[key]})' for key in unexpected])}")
    mismatched = [
        f"{key} (in {sources[key]}): {tuple(weights[key].shape)} in the file, {expected[key]} expected"
        for key in sorted(expected.keys() & weights.keys())
        if tuple(weights[key].shape) != expected[key]
    ]
    if mismatched:
        problems.append(f"wrong shape: {_short_list(mismatched)}")
    if problems:
        raise CheckpointError(f"{model_dir}: weights do not match config.json; " + "; ".join(problems))


def resolve_vision_tower_dir(name: str, model_dir: Path) -> Path | None:
    """The local directory `mm_vision_tower` names: relative to the checkpoint first, then as given; None if neither."""
    for candidate in (model_dir / name, Path(name)):
        if candidate.is_dir():
            return candidate
    return None


def load_vision_config(config: MobileVLMConfig, tower_dir: Path | None) -> CLIPVisionConfig:
    """The CLIP vision config from the tower directory's config.json (a CLIPConfig or CLIPVisionConfig), else a known one."""
    if tower_dir is not None and (tower_dir / "config.json").is_file():
        path = tower_dir / "config.json"
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            fields = fields.get("vision_config", fields)
            vision_config = CLIPVisionConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type", "auto_map")})
        except (OSError, ValueError, TypeError) as error:
            raise ConfigError(f"{path}: not a CLIP vision config ({error})") from error
    elif config.mm_vision_tower in KNOWN_VISION_TOWERS:
        vision_config = CLIPVisionConfig(**KNOWN_VISION_TOWERS[config.mm_vision_tower])
    else:
        raise ConfigError(
            f"{config.path}: field 'mm_vision_tower': {config.mm_vision_tower!r} is neither a local directory "
            f"(relative to {config.path.parent} or absolute) nor a known tower ({', '.join(KNOWN_VISION_TOWERS)})"
        )
    num_states = vision_config.num_hidden_layers + 1
    if not -num_states <= config.mm_vision_select_layer < num_states:
        raise ConfigError(f"{config.path}: field 'mm_vision_select_layer': {config.mm_vision_select_layer} is outside the "
                          f"{num_states} hidden states of the vision tower")
    if vision_config.hidden_size != config.mm_hidden_size:
        raise ConfigError(f"{config.path}: field 'mm_hidden_size': {config.mm_hidden_size} but the vision tower is "
                          f"{vision_config.hidden_size} wide")
    return vision_config


def clip_vision_weights(weights: dict[str, torch.Tensor], tower_dir: Path) -> dict[str, torch.Tensor]:
    """The vision part of a CLIP checkpoint, in the 4.x `vision_model.*` layout; text tower and projections are dropped."""
    vision = {key: tensor for key, tensor in weights.items() if key.startswith("vision_model.")}
    if not vision:
        raise CheckpointError(f"{tower_dir}: holds no `vision_model.*` tensors (expected a CLIP checkpoint)")
    return vision


def _short_list(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} ... and {len(items) - limit} more"
