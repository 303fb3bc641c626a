"""Writing checkpoints in the official MobileVLM layout, for the models this package makes itself: the bench's
random-weight models and `mobilevlm train`'s demo model. Both are then read by the same loader as a downloaded
checkpoint, so they are written the way upstream writes one:

    config.json                         LLaMA fields, then the multimodal ones (`mm_*`); the tower in a local directory
    <tower>/config.json                 the CLIP vision config (and, for the demo, preprocessor_config.json)
    tokenizer.model                     a LLaMA-style sentencepiece BPE
    model.safetensors                   fp16, every key as upstream names it

JSON keeps the order of the fields given: the shipped demo checkpoint is reproduced byte for byte from its seed.
"""

import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from safetensors.torch import save_file

from mobilevlm_ros.model.preprocess import PREPROCESSOR_FILE, ImageProcessor

# LLaMA's settings as MobileLLaMA's config.json has them; the token ids are those `write_tokenizer` assigns.
LLAMA = dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def checkpoint_config(language: Mapping[str, Any], tower_dir: str, projector_type: str, mm_hidden_size: int) -> dict[str, Any]:
    """config.json as MobileVLM writes it: the LLaMA fields `language`, then mm_*: the tower in the directory
    `tower_dir` beside it, patch features of its second-to-last layer, frames padded to a square."""
    return {
        "architectures": ["MobileLlamaForCausalLM"], "model_type": "mobilevlm", "torch_dtype": "float16", **language,
        "mm_vision_tower": tower_dir, "vision_tower_type": "clip", "mm_projector_type": projector_type,
        "mm_hidden_size": mm_hidden_size, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }


def write_tokenizer(path: Path, sentences: Iterable[str], vocab_size: int) -> None:
    """A LLaMA-style sentencepiece BPE (byte fallback, unk 0 / bos 1 / eos 2, no pad, digits split) trained on
    `sentences`; `vocab_size` is the most pieces it gets (a small corpus gives fewer)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        hard_vocab_limit=False, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def write_checkpoint(directory: Path, config: Mapping[str, Any], vision: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
    """config.json, the tower directory `config["mm_vision_tower"]` with the CLIP vision config `vision`, and
    `weights` (a state dict) as fp16 model.safetensors. The tokenizer is written on its own: a model is sized by it."""
    _write_json(directory / "config.json", config)
    tower = directory / config["mm_vision_tower"]
    tower.mkdir(exist_ok=True)
    _write_json(tower / "config.json", {"model_type": "clip_vision_model", **vision})
    tensors = {key: value.detach().to("cpu", torch.float16).contiguous() for key, value in weights.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def write_preprocessor_config(tower: Path, image_size: int) -> None:
    """CLIP's image processor settings at `image_size` (resize and centre crop, bicubic, CLIP's mean and std)."""
    _write_json(tower / PREPROCESSOR_FILE, {
        "crop_size": image_size, "size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": list(ImageProcessor.image_mean), "image_std": list(ImageProcessor.image_std), "resample": 3,
        "image_processor_type": "CLIPImageProcessor",
    })


def _write_json(path: Path, fields: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(fields, indent=2) + "\n")
