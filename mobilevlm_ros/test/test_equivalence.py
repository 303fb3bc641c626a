"""Our logits equal an independent composition: transformers' CLIPVisionModel + the projector math + LlamaForCausalLM.

The reference reads the checkpoint files itself and writes the projectors out with torch.nn.functional, following
upstream's layer definitions, so it shares nothing with the library but the files on disk.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from mobilevlm_ros.model.prompt import IMAGE_TOKEN_INDEX
from mobilevlm_ros.runtime.vlm import MobileVLM
from tiny_checkpoint import TINY_CLIP, TINY_LLAMA

TOWER = "model.vision_tower.vision_tower.vision_model."
PROJ = "model.mm_projector."


def layer_norm_2d(x, weight, bias):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, 1e-5).permute(0, 3, 1, 2)


def inverted_residual(x, w, prefix, stride):
    """MobileNetV3 block, expansion 1: depthwise conv + LN + hardswish, SE, pointwise conv + LN (+ input if stride 1)."""
    y = F.conv2d(x, w[prefix + "0.0.weight"], stride=stride, padding=1, groups=x.shape[1])
    y = F.hardswish(layer_norm_2d(y, w[prefix + "0.1.weight"], w[prefix + "0.1.bias"]))
    scale = y.mean(dim=(2, 3), keepdim=True)
    scale = F.relu(F.conv2d(scale, w[prefix + "1.fc1.weight"], w[prefix + "1.fc1.bias"]))
    y = y * F.hardsigmoid(F.conv2d(scale, w[prefix + "1.fc2.weight"], w[prefix + "1.fc2.bias"]))
    y = layer_norm_2d(F.conv2d(y, w[prefix + "2.0.weight"]), w[prefix + "2.1.weight"], w[prefix + "2.1.bias"])
    return y + x if stride == 1 else y


def reference_projector(features, w, projector_type):
    batch, tokens, _ = features.shape
    side = int(tokens**0.5)

    def to_grid(x):
        return x.permute(0, 2, 1).reshape(batch, x.shape[2], side, side)

    if projector_type == "linear":
        return F.linear(features, w[PROJ + "weight"], w[PROJ + "bias"])
    if projector_type == "mlp2x_gelu":
        return F.linear(F.gelu(F.linear(features, w[PROJ + "0.weight"], w[PROJ + "0.bias"])), w[PROJ + "2.weight"], w[PROJ + "2.bias"])
    if projector_type == "ldpnetv2":
        x = F.linear(F.gelu(F.linear(features, w[PROJ + "mlp.mlp.0.weight"], w[PROJ + "mlp.mlp.0.bias"])),
                     w[PROJ + "mlp.mlp.2.weight"], w[PROJ + "mlp.mlp.2.bias"])
        grid = F.avg_pool2d(to_grid(x), 2)  # 24x24 -> 12x12
        grid = F.conv2d(grid, w[PROJ + "peg.peg.0.weight"], w[PROJ + "peg.peg.0.bias"], padding=1, groups=grid.shape[1]) + grid
        return grid.flatten(2).transpose(1, 2)
    if projector_type == "ldpnet":
        x = F.linear(F.gelu(F.linear(features, w[PROJ + "model.mlp.1.weight"], w[PROJ + "model.mlp.1.bias"])),
                     w[PROJ + "model.mlp.3.weight"], w[PROJ + "model.mlp.3.bias"])
        grid = inverted_residual(to_grid(x), w, PROJ + "model.mb_block.1.block.", 1)
        grid = inverted_residual(grid, w, PROJ + "model.mb_block.2.block.", 2)
        return grid.flatten(2).transpose(1, 2)
    raise ValueError(projector_type)


def reference_logits(checkpoint: Path, pixel_values: torch.Tensor, input_ids: list[int]) -> torch.Tensor:
    weights = {key: value.float() for key, value in load_file(checkpoint / "model.safetensors").items()}
    config = json.loads((checkpoint / "config.json").read_text())
    if "v2" in config["mm_projector_type"]:
        tower_weights = {key[len(TOWER):]: value for key, value in weights.items() if key.startswith(TOWER)}
    else:  # upstream v1 reloads CLIP from mm_vision_tower
        tower_file = load_file(checkpoint / config["mm_vision_tower"] / "model.safetensors")
        tower_weights = {key[len("vision_model."):]: value for key, value in tower_file.items() if key.startswith("vision_model.")}
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    clip.load_state_dict(tower_weights, strict=True)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=config["vocab_size"], **TINY_LLAMA)).eval()
    llm.load_state_dict({k: v for k, v in weights.items() if not k.startswith((TOWER, PROJ))}, strict=True)
    with torch.no_grad():
        features = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        image_embeds = reference_projector(features, weights, config["mm_projector_type"])[0]
        split = input_ids.index(IMAGE_TOKEN_INDEX)
        embed = llm.get_input_embeddings()
        inputs_embeds = torch.cat([embed(torch.tensor(input_ids[:split])), image_embeds, embed(torch.tensor(input_ids[split + 1:]))])
        return llm(inputs_embeds=inputs_embeds[None]).logits[0]


@pytest.mark.parametrize("projector", ["ldpnetv2", "ldpnet", "mlp2x_gelu", "linear"])
def test_logits_equal_the_independent_composition(make_checkpoint, camera_image, projector):
    checkpoint = make_checkpoint(projector_type=projector, dtype=torch.float32)
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu")
    input_ids = vlm.prompt_ids("What colour is the square?")
    with torch.no_grad():
        llm = vlm.language.model
        ours = llm(inputs_embeds=llm.embed_with_images(input_ids, vlm.encode_image(camera_image))).logits[0]
    pixel_values = vlm.image_processor(camera_image)[None]
    expected = reference_logits(checkpoint, pixel_values, input_ids)
    num_image_tokens = 576 if projector in ("linear", "mlp2x_gelu") else 144
    assert ours.shape == expected.shape == (len(input_ids) - 1 + num_image_tokens, config_vocab(checkpoint))
    assert (ours - expected).abs().max().item() <= 1e-4
    # The image must matter: the reference with another image differs by far more than the tolerance.
    other = reference_logits(checkpoint, vlm.image_processor(camera_image[::-1].copy())[None], input_ids)
    assert (other - expected).abs().max().item() > 1e-2


def config_vocab(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["vocab_size"]


def test_vision_tower_runs_only_up_to_the_selected_layer(make_checkpoint):
    vlm = MobileVLM.from_pretrained(make_checkpoint(), device="cpu")
    tower = vlm.vision.vision_path.vision_tower
    assert tower.num_layers_run == TINY_CLIP["num_hidden_layers"] - 1
    calls = []
    last = tower.vision_tower.vision_model.encoder.layers[-1]
    handle = last.register_forward_hook(lambda *args: calls.append(1))
    try:
        tower(torch.zeros(1, 3, 336, 336))
    finally:
        handle.remove()
    assert not calls
