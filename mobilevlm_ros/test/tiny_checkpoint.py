"""Writers of tiny MobileVLM checkpoints in the official on-disk format, independent of the library under test.

Key names and shapes are spelled out here from upstream's layout (not taken from our modules), so a naming mistake
in the library fails to load instead of being mirrored. The LLaMA and CLIP parts come from transformers' own models.
"""

import io
import json
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red circle on a grey floor.",
    "USER: How many shapes are there? ASSISTANT: There are 3 shapes.",
    "Is there a blue square? Yes. Is there a green triangle? No.",
    "Go to the red door. Turn left, turn right, move forward, stop.",
    "The robot sees a table, a chair, a person and a yellow box on the left.",
    "Colour, shape, count, left, right, centre, small, large, near, far.",
]

TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16,
)
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
# What a default tiny checkpoint gives the language model: ldpnetv2 pools the tower's 24x24 patch grid to 12x12 tokens.
IMAGE_TOKENS = (TINY_CLIP["image_size"] // TINY_CLIP["patch_size"] // 2) ** 2
CONTEXT_LENGTH = TINY_LLAMA["max_position_embeddings"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VISION_PREFIX = "model.vision_tower.vision_tower."


def train_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A real sentencepiece BPE model with LLaMA's settings (byte fallback, dummy prefix, ids unk 0 / bos 1 / eos 2)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 4), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        hard_vocab_limit=False, minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def tiny_llama(hidden_size: int = TINY_LLAMA["hidden_size"]) -> dict:
    """TINY_LLAMA, or as wide as `hidden_size` (the MLP twice that)."""
    return TINY_LLAMA | {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size}


def official_config(projector_type: str, vocab_size: int, vision_tower: str, hidden_size: int = TINY_LLAMA["hidden_size"]) -> dict:
    """config.json fields as MobileVLM writes them (LLaMA fields plus mm_*)."""
    return {
        "_name_or_path": "tiny-mobilevlm",
        "architectures": ["MobileLlamaForCausalLM"],
        "model_type": "mobilevlm",
        "torch_dtype": "float16",
        "vocab_size": vocab_size,
        **tiny_llama(hidden_size),
        "mm_vision_tower": vision_tower,
        "vision_tower_type": "clip",
        "mm_projector_type": projector_type,
        "mm_hidden_size": TINY_CLIP["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def _normal(generator: torch.Generator, *shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std + mean


def projector_state_dict(projector_type: str, generator: torch.Generator, width: int = TINY_CLIP["hidden_size"],
                         hidden: int = TINY_LLAMA["hidden_size"]) -> dict[str, torch.Tensor]:
    """Upstream's projector keys and shapes, written out."""
    p = "model.mm_projector."
    if projector_type == "ldpnetv2":
        return {
            p + "mlp.mlp.0.weight": _normal(generator, hidden, width), p + "mlp.mlp.0.bias": _normal(generator, hidden),
            p + "mlp.mlp.2.weight": _normal(generator, hidden, hidden), p + "mlp.mlp.2.bias": _normal(generator, hidden),
            p + "peg.peg.0.weight": _normal(generator, hidden, 1, 3, 3), p + "peg.peg.0.bias": _normal(generator, hidden),
        }
    if projector_type == "ldpnet":
        squeeze = hidden // 4  # make_divisible(hidden // 4, 8) for the multiples of 32 written here
        sd = {
            p + "model.mlp.1.weight": _normal(generator, hidden, width), p + "model.mlp.1.bias": _normal(generator, hidden),
            p + "model.mlp.3.weight": _normal(generator, hidden, hidden), p + "model.mlp.3.bias": _normal(generator, hidden),
        }
        for block in (1, 2):
            b = f"{p}model.mb_block.{block}.block."
            sd |= {
                b + "0.0.weight": _normal(generator, hidden, 1, 3, 3),
                b + "0.1.weight": _normal(generator, hidden, mean=1.0), b + "0.1.bias": _normal(generator, hidden),
                b + "1.fc1.weight": _normal(generator, squeeze, hidden, 1, 1), b + "1.fc1.bias": _normal(generator, squeeze),
                b + "1.fc2.weight": _normal(generator, hidden, squeeze, 1, 1), b + "1.fc2.bias": _normal(generator, hidden),
                b + "2.0.weight": _normal(generator, hidden, hidden, 1, 1),
                b + "2.1.weight": _normal(generator, hidden, mean=1.0), b + "2.1.bias": _normal(generator, hidden),
            }
        return sd
    if projector_type == "mlp2x_gelu":
        return {
            p + "0.weight": _normal(generator, hidden, width), p + "0.bias": _normal(generator, hidden),
            p + "2.weight": _normal(generator, hidden, hidden), p + "2.bias": _normal(generator, hidden),
        }
    if projector_type == "linear":
        return {p + "weight": _normal(generator, hidden, width), p + "bias": _normal(generator, hidden)}
    raise ValueError(projector_type)


def clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random tiny CLIP vision tower in transformers 4.x's key layout (`vision_model.*`)."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))
    # CLIP's default init makes every patch feature nearly the same; spread them so images differ measurably.
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return {"vision_model." + key: value.clone() for key, value in tower.state_dict().items()}


def llama_state_dict(vocab_size: int, seed: int, hidden_size: int = TINY_LLAMA["hidden_size"]) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **tiny_llama(hidden_size)))
    with torch.no_grad():
        for parameter in llm.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return {key: value.clone() for key, value in llm.state_dict().items()}


def write_weights(directory: Path, weights: dict[str, torch.Tensor], fmt: str) -> None:
    """`safetensors`: one model.safetensors; `bin`: one pytorch_model.bin; `bin-sharded`/`safetensors-sharded`: 2 shards + index."""
    weights = {key: tensor.contiguous() for key, tensor in weights.items()}
    if fmt == "safetensors":
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(weights, directory / "pytorch_model.bin")
    elif fmt in ("bin-sharded", "safetensors-sharded"):
        keys = sorted(weights)
        halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
        suffix = "safetensors" if fmt.startswith("safetensors") else "bin"
        stem = "model" if suffix == "safetensors" else "pytorch_model"
        weight_map = {}
        for index, shard_keys in enumerate(halves, start=1):
            name = f"{stem}-{index:05d}-of-00002.{suffix}"
            shard = {key: weights[key] for key in shard_keys}
            if suffix == "safetensors":
                save_file(shard, directory / name, metadata={"format": "pt"})
            else:
                torch.save(shard, directory / name)
            weight_map |= dict.fromkeys(shard_keys, name)
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index_name = f"{stem}.{suffix}.index.json"
        (directory / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        raise ValueError(fmt)


def write_clip_tower(directory: Path, seed: int) -> Path:
    """A local CLIP model directory like openai/clip-vit-large-patch14-336 (a full CLIPConfig, text keys included)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": TINY_CLIP["projection_dim"],
        "text_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        "vision_config": dict(TINY_CLIP),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "crop_size": TINY_CLIP["image_size"], "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": TINY_CLIP["image_size"],
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    generator = torch.Generator().manual_seed(seed)
    weights = clip_state_dict(seed) | {
        "text_model.embeddings.token_embedding.weight": _normal(generator, 50, 16),
        "logit_scale": torch.tensor(2.6592),
        "visual_projection.weight": _normal(generator, TINY_CLIP["projection_dim"], TINY_CLIP["hidden_size"]),
    }
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def write_checkpoint(
    directory: Path,
    tokenizer_model: Path,
    projector_type: str = "ldpnetv2",
    fmt: str = "safetensors",
    vision_tower: str = "clip-vit-tiny",
    store_tower: bool = True,
    write_tower_dir: bool = True,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    context_length: int = TINY_LLAMA["max_position_embeddings"],
    hidden_size: int = TINY_LLAMA["hidden_size"],
) -> Path:
    """A tiny MobileVLM checkpoint directory: config.json, tokenizer.model, weights in `fmt` and `dtype`.

    `store_tower` stores the vision tower in the checkpoint (as official ones do); `write_tower_dir` also writes a
    CLIP directory (other random weights) at `vision_tower` relative to the checkpoint, where config.json points.
    `context_length` only changes config.json (RoPE has no position weights). `hidden_size` widens the LLM (and the
    projector's output): 256 gives rows that llama.cpp's k-quants and CPU repacking take.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if write_tower_dir:
        write_clip_tower(directory / vision_tower, seed + 2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    vocab_size = sp.get_piece_size()
    config = official_config(projector_type, vocab_size, vision_tower, hidden_size) | {"max_position_embeddings": context_length}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}))
    generator = torch.Generator().manual_seed(seed)
    weights = llama_state_dict(vocab_size, seed, hidden_size) | projector_state_dict(projector_type, generator, hidden=hidden_size)
    if store_tower:
        weights |= {VISION_PREFIX + key: value for key, value in clip_state_dict(seed + 1).items()}
    write_weights(directory, {key: value.to(dtype) for key, value in weights.items()}, fmt)
    return directory
