"""MobileVLM's config.json: a LLaMA config plus the multimodal (`mm_*`) fields upstream adds.

The LLaMA part becomes a `transformers.LlamaConfig`; the multimodal part is validated here so that a bad checkpoint
fails at load time with the file and the field named, not deep inside a forward pass.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from mobilevlm_ros.errors import ConfigError

CONFIG_FILE = "config.json"

# Keys that say how upstream's code was organised, not what the model is. `auto_map` in particular names remote code,
# which we never import.
_NON_MODEL_KEYS = {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path"}

_MM_DEFAULTS = {
    # Upstream's defaults where it reads a field with getattr(config, name, default).
    "mm_projector_type": "linear",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "vision_tower_type": "clip",
    "image_aspect_ratio": "pad",
    "mm_use_im_start_end": False,
}

_REQUIRED_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

_MLP_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass(frozen=True)
class MobileVLMConfig:
    """What a MobileVLM checkpoint is: its language model config and how images reach it."""

    path: Path
    text_config: LlamaConfig
    mm_vision_tower: str
    mm_projector_type: str
    mm_hidden_size: int
    mm_vision_select_layer: int
    mm_vision_select_feature: str
    image_aspect_ratio: str | None

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def context_length(self) -> int:
        """Token budget of one conversation: upstream's `max_sequence_length`, else the LLaMA position limit."""
        return getattr(self.text_config, "max_sequence_length", None) or self.text_config.max_position_embeddings

    @property
    def is_v2(self) -> bool:
        """Upstream's own test (`'v2' in mm_projector_type`); it decides where the vision tower's weights come from."""
        return "v2" in self.mm_projector_type

    @property
    def mlp_depth(self) -> int | None:
        match = _MLP_PROJECTOR.match(self.mm_projector_type)
        return int(match.group(1)) if match else None


def load_config(model_dir: str | Path) -> MobileVLMConfig:
    """Read and validate `<model_dir>/config.json`."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: missing (a MobileVLM checkpoint directory holds config.json)")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(fields, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(fields).__name__}")
    return parse_config(fields, path)


def parse_config(fields: dict[str, Any], path: Path) -> MobileVLMConfig:
    """Validate config fields read from `path` (named in every error)."""

    def fail(field: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: field '{field}': {problem}")

    for field in _REQUIRED_INT_FIELDS:
        value = fields.get(field)
        if value is None:
            raise fail(field, "missing")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise fail(field, f"expected a positive integer, found {value!r}")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise fail("num_attention_heads", f"{fields['num_attention_heads']} does not divide hidden_size {fields['hidden_size']}")

    mm = {name: fields.get(name, default) for name, default in _MM_DEFAULTS.items()}
    vision_tower = fields.get("mm_vision_tower", fields.get("vision_tower"))
    if not isinstance(vision_tower, str) or not vision_tower:
        raise fail("mm_vision_tower", "missing (names the CLIP vision tower: a directory or a model name)")
    if mm["vision_tower_type"] != "clip":
        raise fail("vision_tower_type", f"unsupported {mm['vision_tower_type']!r} (only 'clip' is supported)")

    projector = mm["mm_projector_type"]
    if not isinstance(projector, str) or not (
        projector == "linear" or _MLP_PROJECTOR.match(projector) or projector.startswith("ldpnet")
    ):
        raise fail("mm_projector_type", f"unknown projector type {projector!r} (expected linear, mlp<N>x_gelu, ldpnet, ldpnetv2)")

    mm_hidden_size = fields.get("mm_hidden_size")
    if not isinstance(mm_hidden_size, int) or isinstance(mm_hidden_size, bool) or mm_hidden_size <= 0:
        raise fail("mm_hidden_size", f"expected a positive integer (the vision tower's width), found {mm_hidden_size!r}")
    if not isinstance(mm["mm_vision_select_layer"], int) or isinstance(mm["mm_vision_select_layer"], bool):
        raise fail("mm_vision_select_layer", f"expected an integer, found {mm['mm_vision_select_layer']!r}")
    if mm["mm_vision_select_feature"] not in ("patch", "cls_patch"):
        raise fail("mm_vision_select_feature", f"unsupported {mm['mm_vision_select_feature']!r} (expected patch or cls_patch)")
    if mm["mm_use_im_start_end"]:
        raise fail("mm_use_im_start_end", "true is not supported (MobileVLM checkpoints set false)")

    llama_fields = {key: value for key, value in fields.items() if key not in _NON_MODEL_KEYS}
    llama_fields.setdefault("tie_word_embeddings", False)
    try:
        text_config = LlamaConfig(**llama_fields)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: not a valid LLaMA config ({error})") from error

    return MobileVLMConfig(
        path=path,
        text_config=text_config,
        mm_vision_tower=vision_tower,
        mm_projector_type=projector,
        mm_hidden_size=mm_hidden_size,
        mm_vision_select_layer=mm["mm_vision_select_layer"],
        mm_vision_select_feature=mm["mm_vision_select_feature"],
        image_aspect_ratio=mm["image_aspect_ratio"],
    )
