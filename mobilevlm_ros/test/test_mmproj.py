"""mmproj export: what llama.cpp's mtmd reads (metadata, tensor names, types), and mtmd's image embeddings from it
against ours, on the same pixels and end to end from a frame (mtmd resizing and padding it itself)."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mobilevlm_ros.cli import main
from mobilevlm_ros.demo import DEMO_CHECKPOINT
from mobilevlm_ros.errors import ConfigError
from mobilevlm_ros.export.mmproj import build_mmproj, mmproj_artifact, write_mmproj
from mobilevlm_ros.model.checkpoint import load_checkpoint
from mobilevlm_ros.model.preprocess import ImageProcessor
from mobilevlm_ros.runtime.ggml_vision import GgmlVision
from tiny_checkpoint import CLIP_MEAN, CLIP_STD, TINY_CLIP
from vision_graphs import cosine, real_size_vision_model

PROJECTORS = {"ldpnetv2": ("ldpv2", 144), "ldpnet": ("ldp", 144), "mlp2x_gelu": ("mlp", 576)}


def frame(height: int, width: int, seed: int = 7) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 4: 3 * height // 4, width // 3: 2 * width // 3] = (200, 30, 30)
    return image


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint):
    """projector -> (directory, fp32 checkpoint loaded vision-only)."""
    loaded = {}
    for projector in PROJECTORS:
        directory = make_checkpoint(projector_type=projector, dtype=torch.float32)
        loaded[projector] = directory, load_checkpoint(directory, with_language_model=False)
    return loaded


def read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}, {tensor.name: tensor for tensor in reader.tensors}


def test_metadata_and_tensors_are_what_clip_reads(checkpoints, tmp_path):
    directory, checkpoint = checkpoints["ldpnetv2"]
    details = build_mmproj(directory, "f16", tmp_path / "mmproj.gguf", checkpoint.model)
    fields, tensors = read(tmp_path / "mmproj.gguf")
    layers = 2  # mm_vision_select_layer -2 of a 3-layer tower: hidden state 2, the output of layer 1
    assert details == {"projector_type": "ldpv2", "layers": layers, "cls_layout": "dropped", "tensor_types": details["tensor_types"]}
    expected = {
        "general.architecture": "clip", "general.file_type": 1, "clip.projector_type": "ldpv2",
        "clip.has_vision_encoder": True, "clip.has_text_encoder": False, "clip.has_llava_projector": True,
        "clip.vision.image_size": 336, "clip.vision.patch_size": 14, "clip.vision.embedding_length": TINY_CLIP["hidden_size"],
        "clip.vision.feed_forward_length": TINY_CLIP["intermediate_size"], "clip.vision.attention.head_count": 4,
        "clip.vision.projection_dim": TINY_CLIP["projection_dim"], "clip.vision.block_count": layers,
        "clip.vision.feature_layer": [layers], "clip.use_gelu": False,
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["clip.vision.image_mean"] == pytest.approx(CLIP_MEAN) and fields["clip.vision.image_std"] == pytest.approx(CLIP_STD)
    per_layer = {f"{name}.{kind}" for name in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down", "ln1", "ln2")
                 for kind in ("weight", "bias")}
    assert set(tensors) == {"v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "v.pre_ln.bias"} | {
        f"v.blk.{i}.{name}" for i in range(layers) for name in per_layer
    } | {f"mm.model.mlp.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")} | {"mm.model.peg.0.weight", "mm.model.peg.0.bias"}
    shape = lambda name: [int(n) for n in reversed(tensors[name].shape)]  # noqa: E731 (numpy order)
    # No class token (the pinned clip puts it last, see export/mmproj.py): the 576 patch positions, row 0 dropped.
    assert shape("v.position_embd.weight") == [576, TINY_CLIP["hidden_size"]]
    tower = checkpoint.model.vision_path.vision_tower.vision_tower.vision_model
    positions = np.array(tensors["v.position_embd.weight"].data, dtype=np.float32).reshape(576, -1)
    assert np.allclose(positions, tower.embeddings.position_embedding.weight[1:].detach().numpy(), atol=1e-3)
    # ffn_up is fc1 (width -> FFN width), ffn_down fc2, so clip does not swap them.
    assert shape("v.blk.0.ffn_up.weight") == [TINY_CLIP["intermediate_size"], TINY_CLIP["hidden_size"]]
    assert shape("mm.model.peg.0.weight") == [64, 3, 3]
    types = {name: tensor.tensor_type.name for name, tensor in tensors.items()}
    assert types["v.blk.0.attn_q.weight"] == types["mm.model.mlp.0.weight"] == types["v.patch_embd.weight"] == "F16"
    assert types["v.blk.0.ln1.weight"] == types["v.blk.0.attn_q.bias"] == types["mm.model.peg.0.bias"] == "F32"
    assert types["mm.model.peg.0.weight"] == "F16"  # ggml's depthwise convolution computes in F16 in every file


def test_f32_file_keeps_matrices_in_f32_and_ldp_names(checkpoints, tmp_path):
    directory, checkpoint = checkpoints["ldpnet"]
    build_mmproj(directory, "f32", tmp_path / "mmproj.gguf", checkpoint.model)
    fields, tensors = read(tmp_path / "mmproj.gguf")
    assert fields["clip.projector_type"] == "ldp" and fields["general.file_type"] == 0
    block = "mm.model.mb_block.{}.block.{}"
    names = {block.format(b, part) + suffix for b in (1, 2) for part, suffixes in (
        ("0.0", [".weight"]), ("0.1", [".weight", ".bias"]), ("1.fc1", [".weight", ".bias"]), ("1.fc2", [".weight", ".bias"]),
        ("2.0", [".weight"]), ("2.1", [".weight", ".bias"])) for suffix in suffixes}
    assert names | {f"mm.model.mlp.{i}.{kind}" for i in (1, 3) for kind in ("weight", "bias")} <= set(tensors)
    types = {name: tensor.tensor_type.name for name, tensor in tensors.items()}
    assert types["v.blk.0.attn_q.weight"] == types[block.format(1, "1.fc1") + ".weight"] == types["v.patch_embd.weight"] == "F32"
    assert types[block.format(1, "0.0") + ".weight"] == "F16"
    # 1x1 convolutions are matrices: squeeze-excitation [S, C] and the pointwise convolution [C, C].
    assert [int(n) for n in reversed(tensors[block.format(2, "1.fc1") + ".weight"].shape)] == [16, 64]
    assert [int(n) for n in reversed(tensors[block.format(2, "2.0") + ".weight"].shape)] == [64, 64]


@pytest.mark.parametrize("file_type", ["f32", "f16"])
@pytest.mark.parametrize("projector", list(PROJECTORS))
def test_mtmd_embeddings_match_ours_on_the_same_pixels(checkpoints, tmp_path, figures, projector, file_type):
    directory, checkpoint = checkpoints[projector]
    build_mmproj(directory, file_type, tmp_path / "mmproj.gguf", checkpoint.model)
    backend = GgmlVision(tmp_path / "mmproj.gguf")
    frames = [frame(240, 320), frame(400, 700, seed=8)]
    pixels = checkpoint.image_processor.batch(frames)
    with torch.inference_mode():
        ours = checkpoint.model.vision_path(pixels)
    theirs = backend(pixels)
    assert theirs.shape == (2, PROJECTORS[projector][1], 64) == ours.shape
    similarity = cosine(theirs, ours)
    figures[f"mmproj tiny {projector} {file_type}: cosine, max abs (max |ours|)"] = [
        round(similarity, 6), round((theirs - ours).abs().max().item(), 4), round(ours.abs().max().item(), 3)]
    assert similarity >= 0.999
    assert min(cosine(a, b) for a, b in zip(theirs.reshape(-1, 64), ours.reshape(-1, 64), strict=True)) >= 0.999  # every token
    backend.close()


def test_end_to_end_from_a_frame_mtmd_pads_and_resizes_itself(checkpoints, tmp_path, figures):
    """Handed the raw frame, mtmd resizes it (Pillow-style bicubic, as ours) and then pads it; we pad, then resize.
    A 336x336 frame needs neither and gives the shared-pixel result; other sizes differ at the image's edges."""
    directory, checkpoint = checkpoints["ldpnetv2"]
    build_mmproj(directory, "f32", tmp_path / "mmproj.gguf", checkpoint.model)
    backend = GgmlVision(tmp_path / "mmproj.gguf")
    for height, width in ((336, 336), (240, 320), (480, 640), (1080, 1920)):
        image = frame(height, width)
        with torch.inference_mode():
            ours = checkpoint.model.vision_path(checkpoint.image_processor.batch([image]))
        theirs = torch.from_numpy(backend.encode_squares(image))
        similarity = cosine(theirs, ours)
        figures[f"mmproj tiny end to end {width}x{height}: cosine, max abs"] = [
            round(similarity, 6), round((theirs - ours).abs().max().item(), 4)]
        assert similarity >= (0.999 if (height, width) == (336, 336) else 0.95)


def test_class_token_as_llama_cpps_converter_keeps_it_does_not_match(checkpoints, tmp_path, figures):
    """The pinned clip appends the class token after the patches (llama.cpp issue 25814): written as llama.cpp's
    converter writes it, the class token's output reaches the projector and every patch is off by one. When this
    test fails, the llama.cpp in use has fixed the order: make "kept" the default layout (export/mmproj.py)."""
    directory, checkpoint = checkpoints["ldpnetv2"]
    write_mmproj(checkpoint.model, checkpoint.config, checkpoint.image_processor, tmp_path / "kept.gguf", "f32", cls_layout="kept")
    _, tensors = read(tmp_path / "kept.gguf")
    assert "v.class_embd" in tensors and [int(n) for n in reversed(tensors["v.position_embd.weight"].shape)] == [577, 32]
    pixels = checkpoint.image_processor.batch([frame(240, 320)])
    with torch.inference_mode():
        ours = checkpoint.model.vision_path(pixels)
    similarity = cosine(GgmlVision(tmp_path / "kept.gguf")(pixels), ours)
    figures["mmproj tiny ldpnetv2 f32 class token kept (llama.cpp's layout): cosine"] = round(similarity, 6)
    assert similarity < 0.99


def test_cost_of_leaving_the_class_token_out_on_a_trained_tower(figures):
    """What the default layout changes, measured in torch where a trained tower exists: the shipped demo model's
    (mtmd cannot run it: 28-pixel patches). Its tower and projector, with and without the class token in attention."""
    import random

    from mobilevlm_ros.demo.world import random_scene, render

    checkpoint = load_checkpoint(DEMO_CHECKPOINT, with_language_model=False)
    vision = checkpoint.model.vision_path
    tower, projector = vision.vision_tower, vision.mm_projector
    clip = tower.vision_tower.vision_model
    rng = random.Random(3)
    similarities = []
    for _ in range(8):
        pixels = checkpoint.image_processor.batch([render(random_scene(rng))])
        with torch.inference_mode():
            ours = checkpoint.model.vision_path(pixels)
            hidden = clip.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2) + clip.embeddings.position_embedding.weight[1:]
            hidden = clip.pre_layrnorm(hidden)
            for layer in clip.encoder.layers[: tower.num_layers_run]:
                hidden = layer(hidden, None)
            without = projector(hidden)
        similarities.append(cosine(without, ours))
    figures["class token left out, trained demo tower (torch), 8 scenes: min, max cosine"] = [
        round(min(similarities), 4), round(max(similarities), 4)]
    assert 0.98 <= min(similarities) and max(similarities) < 0.99999  # a real, small change


def test_what_mtmd_cannot_run_is_refused_clearly(make_checkpoint, tmp_path):
    linear = load_checkpoint(make_checkpoint(projector_type="linear"), with_language_model=False)
    with pytest.raises(ConfigError, match=r"mtmd has no graph for projector 'linear' \(it runs ldpnetv2, ldpnet and mlp2x_gelu\)"):
        write_mmproj(linear.model, linear.config, linear.image_processor, tmp_path / "linear.gguf")
    demo = load_checkpoint(DEMO_CHECKPOINT, with_language_model=False)  # a 12x12 patch grid (28-pixel patches)
    with pytest.raises(ConfigError, match="llama.cpp's LDP graphs take a 24x24 patch grid; this tower has 12x12"):
        write_mmproj(demo.model, demo.config, demo.image_processor, tmp_path / "demo.gguf")
    with pytest.raises(ConfigError, match=r"unknown mmproj type 'q8_0' \(expected f16, f32\)"):
        mmproj_artifact(make_checkpoint(), "q8_0", tmp_path)
    assert not list(tmp_path.iterdir())


def test_artifact_is_cached_and_rebuilt_when_stale(make_checkpoint, tmp_path):
    directory = make_checkpoint()
    first = mmproj_artifact(directory, "f16", tmp_path)
    assert first.built and first.path.name.startswith("mmproj-gguf-f16-") and first.manifest["component"] == "mmproj"
    assert first.manifest["extra"] == {"export_version": 1, "cls_layout": "dropped"}
    assert first.manifest["details"]["projector_type"] == "ldpv2"
    assert not mmproj_artifact(directory, "f16", tmp_path).built
    kept = mmproj_artifact(directory, "f16", tmp_path, cls_layout="kept")  # another layout is another build
    assert kept.built and kept.manifest["extra"]["cls_layout"] == "kept"
    assert not mmproj_artifact(directory, "f16", tmp_path, cls_layout="kept").built
    first.path.write_bytes(first.path.read_bytes()[:-1] + b"\1")  # corrupt the cached file
    assert mmproj_artifact(directory, "f16", tmp_path, cls_layout="dropped").built


def test_build_command_writes_the_mmproj(make_checkpoint, tmp_path, capsys):
    args = ["build", "--model", str(make_checkpoint()), "--mmproj", "--mmproj-type", "f32", "--engines-dir", str(tmp_path)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "mmproj-gguf-f32-" in lines[2] and "| built |" in lines[2] and "F32" in lines[2]
    assert main(args) == 0
    assert "| cached |" in capsys.readouterr().out
    assert main(["build", "--model", str(make_checkpoint())]) == 1
    assert "nothing to build: give --llm gguf, --vision onnx|tensorrt and/or --mmproj" in capsys.readouterr().err


@pytest.mark.slow
def test_real_size_mtmd_embeddings_match_ours(tmp_path, figures):
    """CLIP ViT-L/14-336 + LDPv2 at 1.7B width, f32 mmproj, on the same pixels."""
    model = real_size_vision_model()
    processor = ImageProcessor()
    pixels = processor.batch([frame(480, 640)])
    with torch.inference_mode():
        ours = model.vision_path(pixels)
    write_mmproj(model, model.mobilevlm_config, processor, tmp_path / "mmproj.gguf", "f32")
    del model
    theirs = GgmlVision(tmp_path / "mmproj.gguf")(pixels)
    assert theirs.shape == ours.shape == (1, 144, 2048)
    similarity = cosine(theirs, ours)
    figures["mmproj 1.7B dims f32, same pixels: cosine, max abs (max |ours|)"] = [
        round(similarity, 6), round((theirs - ours).abs().max().item(), 4), round(ours.abs().max().item(), 3)]
    assert similarity >= 0.999
