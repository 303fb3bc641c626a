"""mmproj export: the vision tower + projector of a MobileVLM checkpoint as the GGUF that llama.cpp's `mtmd` (clip) loads.

The writer is ours, on the `gguf` package, like export/gguf.py for the LLM. What it writes follows what the pinned
llama.cpp's `tools/mtmd/clip.cpp` reads for its llava-style graph (`models/llava.cpp`), which also runs MobileVLM:

- architecture `clip`, `clip.projector_type` `ldpv2` (MobileVLM V2's `ldpnetv2`), `ldp` (v1's `ldpnet`) or `mlp`
  (`mlp2x_gelu`); `clip.has_vision_encoder` true and the legacy `clip.has_text_encoder` false /
  `clip.has_llava_projector` true that older llama.cpp builds still read;
- `clip.vision.*`: image and patch size, width, FFN width, heads, LayerNorm eps, `projection_dim` (required though
  unused), `image_mean` / `image_std` (the checkpoint's, so mtmd normalizes as we do), and `block_count` /
  `feature_layer`: the tower runs up to `mm_vision_select_layer` (hidden state 23 of 24 layers for -2), so exactly the
  layers it runs are written and `feature_layer` names that hidden state. Without `feature_layer` clip runs
  `block_count - 1` layers (checked: a file without it matches ours only with one more layer written); llama.cpp's
  converter, pointed at CLIP's own directory (whose config has no `mm_vision_select_layer`), writes 23 layers and no
  `feature_layer`, so its MobileVLM files run 22 of CLIP's layers instead of 23;
- `clip.use_gelu` false: CLIP-L's FFN is quick_gelu (`gelu` towers set it true; anything else is refused);
- tensors `v.patch_embd.weight`, `v.position_embd.weight`, `v.class_embd` (only with the class token kept, see
  below), `v.pre_ln.*`, per layer
  `v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}.*` (`ffn_up` is CLIP's fc1, `ffn_down` its fc2:
  llama.cpp's converter swaps the two and clip swaps them back when it sees that; we write them the right way round),
  no `v.post_ln` (MobileVLM never applies the tower's post-LayerNorm), and the projector under `mm.`:
  LDPv2 `mm.model.mlp.{0,2}.*`, `mm.model.peg.0.*`; LDP `mm.model.mlp.{1,3}.*`,
  `mm.model.mb_block.{1,2}.block.{0.0,0.1,1.fc1,1.fc2,2.0,2.1}.*`; MLP `mm.{0,2}.*`.
  1x1 convolutions are squeezed to matrices; depthwise 3x3 kernels are always F16 (ggml's depthwise convolution
  computes in F16), as are matrices in an `f16` file; norms, biases and the class embedding stay F32.

The patch order of the pinned clip (llama.cpp issue 25814): its llava graph appends the class token AFTER the 576
patch tokens, then adds position embeddings 0..576 in that order and hands the projector tokens 1..576. So every
patch gets its left neighbour's position embedding, patch 0 is dropped and the class token's output sits in the last
grid cell: against ours, cosine 0.90 (tiny) and 0.93 (1.7B dims, random weights). No file can undo that with the
class token in it (of the 577 tokens, the class token's is always among the 576 handed on, so one patch is always
lost), so by default the class token is left out: every patch then reaches the projector in order with its own
position embedding, and what differs from ours is only that the tower's attention has no class token to look at
(cosine 0.999999 on random weights; the same change in torch on the trained demo tower: 0.993-0.9986, see README).
`CLS_LAYOUTS` chooses; "kept" is what llama.cpp's converter writes, and the right choice once llama.cpp fixes the
order (test_mmproj.py's canary test says when).

Our LDP graphs assume llama.cpp's: clip hard-codes a 24x24 patch grid (CLIP-L/14 at 336 px) for LDP and LDPv2, so
other grids are refused.
"""

import importlib.metadata
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from torch import nn

from mobilevlm_ros.choices import MMPROJ_TYPES, check_choice
from mobilevlm_ros.errors import ConfigError
from mobilevlm_ros.export.artifacts import Artifact, ArtifactKey, build_command, get_or_build, model_fingerprint
from mobilevlm_ros.model.checkpoint import load_checkpoint, resolve_vision_tower_dir
from mobilevlm_ros.model.config import MobileVLMConfig
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM
from mobilevlm_ros.model.preprocess import ImageProcessor
from mobilevlm_ros.model.vision import CLIPVisionTower

logger = logging.getLogger(__name__)

# Bump when the written file changes for the same checkpoint, so cached mmproj files are rebuilt.
EXPORT_VERSION = 1
LDP_GRID = 24  # clip's LDP / LDPv2 graphs take a 24x24 patch grid, hard-coded
# "dropped": the class token is left out of the file (all 576 patches reach the projector, in order, with their own
# position embeddings; the tower then runs without the class token). "kept": in the file as llama.cpp's converter
# writes it (the pinned clip's order defect then applies). See the module docstring.
CLS_LAYOUTS = ("dropped", "kept")
ClsLayout = Literal["dropped", "kept"]
DEFAULT_CLS_LAYOUT: ClsLayout = "dropped"


def clip_projector_type(config: MobileVLMConfig) -> str:
    """clip.cpp's name of the checkpoint's projector, or a ConfigError naming what mtmd cannot run."""
    projector = config.mm_projector_type
    if projector.startswith("ldpnetv2"):
        return "ldpv2"
    if projector.startswith("ldpnet"):
        return "ldp"
    if config.mlp_depth == 2:
        return "mlp"
    raise ConfigError(
        f"{config.path}: llama.cpp's mtmd has no graph for projector {projector!r} "
        "(it runs ldpnetv2, ldpnet and mlp2x_gelu)"
    )


def _vision_modules(model: MobileLlamaForCausalLM) -> tuple[CLIPVisionTower, nn.Module]:
    """The torch vision tower and projector."""
    vision = model.vision_path
    return vision.vision_tower, vision.mm_projector


def _array(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy().astype(dtype)


def mmproj_tensors(
    tower: CLIPVisionTower, projector: nn.Module, projector_type: str, file_type: str = "f16",
    cls_layout: ClsLayout = DEFAULT_CLS_LAYOUT,
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array in its file dtype) for every tensor of the mmproj, in numpy's (row-major) shape."""
    matrix = np.float16 if file_type == "f16" else np.float32
    clip = tower.vision_tower.vision_model
    embeddings = clip.embeddings
    # The patch embedding is a convolution whose im2col takes the kernel's type: F32 in an f32 file.
    yield "v.patch_embd.weight", _array(embeddings.patch_embedding.weight, matrix)
    positions = embeddings.position_embedding.weight
    if cls_layout == "dropped":
        positions = positions[1:]  # patch i's own position (row 0 is the class token's)
    else:
        yield "v.class_embd", _array(embeddings.class_embedding, np.float32)
    yield "v.position_embd.weight", _array(positions, matrix)
    yield "v.pre_ln.weight", _array(clip.pre_layrnorm.weight, np.float32)
    yield "v.pre_ln.bias", _array(clip.pre_layrnorm.bias, np.float32)
    for index, layer in enumerate(clip.encoder.layers[: tower.num_layers_run]):
        block, attention = f"v.blk.{index}.", layer.self_attn
        for name, linear in (("attn_q", attention.q_proj), ("attn_k", attention.k_proj), ("attn_v", attention.v_proj),
                             ("attn_out", attention.out_proj), ("ffn_up", layer.mlp.fc1), ("ffn_down", layer.mlp.fc2)):
            yield block + name + ".weight", _array(linear.weight, matrix)
            yield block + name + ".bias", _array(linear.bias, np.float32)
        for name, norm in (("ln1", layer.layer_norm1), ("ln2", layer.layer_norm2)):
            yield block + name + ".weight", _array(norm.weight, np.float32)
            yield block + name + ".bias", _array(norm.bias, np.float32)
    yield from _projector_tensors(projector, projector_type, matrix)


def _projector_tensors(projector: nn.Module, projector_type: str, matrix: type) -> Iterator[tuple[str, np.ndarray]]:
    def linear(name: str, module: nn.Linear) -> Iterator[tuple[str, np.ndarray]]:
        yield name + ".weight", _array(module.weight, matrix)
        yield name + ".bias", _array(module.bias, np.float32)

    def depthwise(name: str, conv: nn.Conv2d) -> Iterator[tuple[str, np.ndarray]]:
        yield name + ".weight", _array(conv.weight.squeeze(1), np.float16)  # [C, 3, 3]
        if conv.bias is not None:
            yield name + ".bias", _array(conv.bias, np.float32)

    if projector_type == "ldpv2":
        yield from linear("mm.model.mlp.0", projector.mlp.mlp[0])
        yield from linear("mm.model.mlp.2", projector.mlp.mlp[2])
        yield from depthwise("mm.model.peg.0", projector.peg.peg[0])
    elif projector_type == "ldp":
        ldp = projector.model
        yield from linear("mm.model.mlp.1", ldp.mlp[1])
        yield from linear("mm.model.mlp.3", ldp.mlp[3])
        for index in (1, 2):
            block, name = ldp.mb_block[index].block, f"mm.model.mb_block.{index}.block."
            yield from depthwise(name + "0.0", block[0][0])
            yield name + "0.1.weight", _array(block[0][1].weight, np.float32)
            yield name + "0.1.bias", _array(block[0][1].bias, np.float32)
            for fc in ("fc1", "fc2"):  # 1x1 convolutions of the squeeze-excitation: matrices
                conv = getattr(block[1], fc)
                yield name + f"1.{fc}.weight", _array(conv.weight.flatten(1), matrix)
                yield name + f"1.{fc}.bias", _array(conv.bias, np.float32)
            yield name + "2.0.weight", _array(block[2][0].weight.flatten(1), matrix)
            yield name + "2.1.weight", _array(block[2][1].weight, np.float32)
            yield name + "2.1.bias", _array(block[2][1].bias, np.float32)
    else:  # mlp2x_gelu: Linear, GELU, Linear
        yield from linear("mm.0", projector[0])
        yield from linear("mm.2", projector[2])


def write_mmproj(
    model: MobileLlamaForCausalLM, config: MobileVLMConfig, image_processor: ImageProcessor, path: str | Path,
    file_type: str = "f16", name: str = "MobileVLM", cls_layout: ClsLayout = DEFAULT_CLS_LAYOUT,
) -> dict[str, Any]:
    """Write the model's vision tower and projector as an mmproj GGUF (`file_type` f16 or f32).

    `cls_layout` (the class-token order of the pinned clip, see the module docstring): "dropped" (the default) leaves
    the class token out, "kept" writes it as llama.cpp's converter does. Returns what the manifest records."""
    check_choice("mmproj type", file_type, MMPROJ_TYPES)
    check_choice("class-token layout", cls_layout, CLS_LAYOUTS)
    projector_type = clip_projector_type(config)
    tower, projector = _vision_modules(model)
    vision = tower.config
    grid = vision.image_size // vision.patch_size
    if projector_type in ("ldp", "ldpv2") and grid != LDP_GRID:
        raise ConfigError(f"{config.path}: llama.cpp's LDP graphs take a {LDP_GRID}x{LDP_GRID} patch grid; this tower has {grid}x{grid}")
    if tower.select_feature != "patch":
        raise ConfigError(f"{config.path}: mtmd feeds the projector patch tokens only, not {tower.select_feature!r}")
    if vision.hidden_act not in ("quick_gelu", "gelu"):
        raise ConfigError(f"{config.path}: mtmd's CLIP runs quick_gelu or gelu, not {vision.hidden_act!r}")
    if not image_processor.pad_to_square:
        logger.warning("%s: mtmd always pads images to a square; this checkpoint crops them (image_aspect_ratio %r)",
                       config.path, config.image_aspect_ratio)

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(name)
    writer.add_description(f"MobileVLM vision tower + {config.mm_projector_type} projector (mobilevlm_ros)")
    writer.add_file_type(1 if file_type == "f16" else 0)
    writer.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, projector_type)
    writer.add_uint32(gguf.Keys.ClipVision.IMAGE_SIZE, vision.image_size)
    writer.add_uint32(gguf.Keys.ClipVision.PATCH_SIZE, vision.patch_size)
    writer.add_uint32(gguf.Keys.ClipVision.EMBEDDING_LENGTH, vision.hidden_size)
    writer.add_uint32(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH, vision.intermediate_size)
    writer.add_uint32(gguf.Keys.ClipVision.PROJECTION_DIM, getattr(vision, "projection_dim", 0) or 0)
    writer.add_uint32(gguf.Keys.ClipVision.Attention.HEAD_COUNT, vision.num_attention_heads)
    writer.add_float32(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS, vision.layer_norm_eps)
    writer.add_uint32(gguf.Keys.ClipVision.BLOCK_COUNT, tower.num_layers_run)
    writer.add_array("clip.vision.feature_layer", [tower.num_layers_run])
    writer.add_array(gguf.Keys.ClipVision.IMAGE_MEAN, [float(v) for v in image_processor.image_mean])
    writer.add_array(gguf.Keys.ClipVision.IMAGE_STD, [float(v) for v in image_processor.image_std])
    writer.add_bool(gguf.Keys.ClipVision.USE_GELU, vision.hidden_act == "gelu")

    tensors = list(mmproj_tensors(tower, projector, projector_type, file_type, cls_layout))
    for tensor_name, array in tensors:
        writer.add_tensor_info(tensor_name, array.shape, array.dtype, array.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, array in tensors:
        writer.write_tensor_data(array)
    writer.close()
    types: dict[str, int] = {}
    for _, array in tensors:
        key = "F16" if array.dtype == np.float16 else "F32"
        types[key] = types.get(key, 0) + 1
    return {"projector_type": projector_type, "layers": tower.num_layers_run, "cls_layout": cls_layout, "tensor_types": types}


def image_processor_for(model: MobileLlamaForCausalLM, model_dir: str | Path) -> ImageProcessor:
    """The checkpoint's image processor (mean, std, padding), as load_checkpoint makes it."""
    config = model.mobilevlm_config
    tower, _ = _vision_modules(model)
    tower_dir = resolve_vision_tower_dir(config.mm_vision_tower, Path(model_dir))
    return ImageProcessor.from_tower_dir(tower_dir, tower.config.image_size, config.image_aspect_ratio == "pad")


def build_mmproj(
    model_dir: str | Path, file_type: str, target: str | Path, model: MobileLlamaForCausalLM | None = None,
    cls_layout: ClsLayout = DEFAULT_CLS_LAYOUT,
) -> dict[str, Any]:
    """Write the mmproj of the checkpoint in `model_dir` to `target`, from `model` when it is already loaded (its
    vision tower and projector, in any dtype), else from the checkpoint's vision weights alone."""
    if model is None:
        # Official checkpoints are fp16: an f16 file loses nothing by loading them as fp16.
        dtype = torch.float32 if file_type == "f32" else torch.float16
        model = load_checkpoint(model_dir, dtype=dtype, with_language_model=False).model
    name = Path(model_dir).resolve().name
    return write_mmproj(model, model.mobilevlm_config, image_processor_for(model, model_dir), target, file_type, name, cls_layout)


def mmproj_artifact(
    model_dir: str | Path, file_type: str = "f16", engines_dir: str | Path | None = None, build: bool | str = True,
    model: MobileLlamaForCausalLM | None = None, cls_layout: ClsLayout = DEFAULT_CLS_LAYOUT, path: str | Path | None = None,
) -> Artifact:
    """The checkpoint's vision tower + projector as an mmproj GGUF in the artifact cache (or at `path`), built when
    missing or stale and `build` (the policy, see get_or_build) allows. Keyed on the llama-cpp-python version too: the
    class-token layout answers the pinned clip (module docstring), so a new llama.cpp rebuilds the file."""
    check_choice("mmproj type", file_type, MMPROJ_TYPES)
    check_choice("class-token layout", cls_layout, CLS_LAYOUTS)
    key = ArtifactKey(
        model_hash=model_fingerprint(model_dir),
        component="mmproj",
        precision=f"gguf-{file_type}",
        runtime="llama.cpp mtmd",
        runtime_version=f"llama-cpp-python {_version('llama_cpp_python')}, gguf {_version('gguf')}",
        device="any",  # like the LLM's GGUF, one file for every llama.cpp backend
        suffix="gguf",
        extra={"export_version": EXPORT_VERSION, "cls_layout": cls_layout},
    )
    command = build_command(model_dir, ["--mmproj", "--mmproj-type", file_type], engines_dir, path)
    return get_or_build(key, lambda target: build_mmproj(model_dir, file_type, target, model, cls_layout), engines_dir, build,
                        path, command)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
