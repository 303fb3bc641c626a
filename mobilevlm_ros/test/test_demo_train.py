"""`mobilevlm train` at micro scale: the recipe runs end to end, is seeded, and writes an official checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mobilevlm_ros.demo.recipe import Recipe
from mobilevlm_ros.demo.train import (
    ATTRIBUTE_CLASSES,
    IGNORE,
    TOWER_DIR,
    SceneSymbols,
    build_model,
    language_loss,
    make_pool,
    patch_labels,
    patch_loss,
    pool_entry,
    token_cells,
    train,
)
from mobilevlm_ros.demo.world import COLOURS, Scene, Shape
from mobilevlm_ros.model.preprocess import ImageProcessor
from mobilevlm_ros.runtime.vlm import MobileVLM

MICRO = Recipe(scenes=8, batch_size=2, questions_per_image=2, vision_steps=2, text_steps=2, align_steps=2, instruct_steps=2)
pytestmark = pytest.mark.slow  # trains twice: tens of seconds


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("train") / "demo", MICRO)


def test_the_recipe_writes_a_checkpoint_in_the_official_layout(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["model_type"] == "mobilevlm" and config["architectures"] == ["MobileLlamaForCausalLM"]
    assert config["mm_projector_type"] == "ldpnet" and config["mm_vision_tower"] == TOWER_DIR
    assert {p.name for p in trained.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model", TOWER_DIR, "training.json"}
    with safe_open(trained / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        assert {weights.get_tensor(key).dtype for key in keys} == {torch.float16}
    assert {"model.mm_projector.model.mlp.1.weight", "model.mm_projector.model.mb_block.2.block.1.fc2.weight", "lm_head.weight",
            "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"} <= keys
    assert json.loads((trained / "training.json").read_text())["recipe"]["instruct_steps"] == MICRO.instruct_steps


def assert_loads_strictly_on_the_cpu_and_answers(checkpoint: Path) -> None:
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu")
    frame = torch.zeros(200, 300, 3, dtype=torch.uint8).numpy()
    assert isinstance(vlm.ask(frame, "What colour is the circle?", max_new_tokens=3), str)


def test_the_checkpoint_loads_strictly_and_answers(trained):
    assert_loads_strictly_on_the_cpu_and_answers(trained)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: trains the micro recipe on it")
def test_the_recipe_trains_on_a_gpu_into_a_checkpoint_the_cpu_loads(tmp_path):
    assert_loads_strictly_on_the_cpu_and_answers(train(tmp_path / "gpu", MICRO, device="cuda"))


def test_the_same_seed_trains_the_same_weights(trained, tmp_path):
    again = train(tmp_path / "again", MICRO)
    assert (again / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    assert (again / "tokenizer.model").read_bytes() == (trained / "tokenizer.model").read_bytes()


def test_the_pool_rendered_on_several_cores_holds_each_scene_with_its_own_image_and_labels():
    processor = ImageProcessor(crop_size=336, shortest_edge=336)
    pool = make_pool(5, seed=3, processor=processor, patch_size=28)
    assert len({scene.texture_seed for scene in pool.scenes}) == 5
    for index, scene in enumerate(pool.scenes):
        pixels, labels = pool_entry(scene, processor, patch_size=28)
        assert np.array_equal(pool.pixels[index], pixels)
        assert all(np.array_equal(pool.labels[name][index], value) for name, value in labels.items())


def test_rows_sharing_the_prompt_and_their_image_get_the_loss_and_gradients_of_the_full_rows():
    model = build_model(vocab_size=64, seed=0)
    prefix = torch.tensor([1, 5, 9, 12, 7])
    images = torch.randn(2, 4, model.config.hidden_size)
    turns = torch.randn(6, 8, model.config.hidden_size)  # three questions about each image
    labels = torch.randint(3, 64, (6, 8))
    labels[:, :2] = IGNORE
    labels[2, 6:] = IGNORE  # a shorter, right-padded row

    shared = language_loss(model, prefix, images, turns, labels)
    (shared_grad,) = torch.autograd.grad(shared, model.model.layers[0].self_attn.q_proj.weight)

    embed = model.model.embed_tokens
    rows = torch.cat([embed(prefix).expand(6, -1, -1), images.repeat_interleave(3, dim=0), turns], dim=1)
    logits = model.lm_head(model.model(inputs_embeds=rows).last_hidden_state[:, -turns.shape[1]:-1])
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    (full_grad,) = torch.autograd.grad(full, model.model.layers[0].self_attn.q_proj.weight)

    assert torch.allclose(shared, full, atol=1e-6)
    assert torch.allclose(shared_grad, full_grad, atol=1e-7, rtol=1e-4)


def test_the_tower_starts_knowing_which_patches_are_neighbours():
    positions = build_model(vocab_size=64, seed=0).model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight
    grid = round((positions.shape[0] - 1) ** 0.5)
    patches = positions[1:].detach().reshape(grid, grid, -1)
    assert torch.all(positions[0] == 0)  # the class token has no place on the grid

    def distance(a: tuple[int, int], b: tuple[int, int]) -> float:
        return (patches[a] - patches[b]).norm().item()

    centre = (grid // 2, grid // 2)
    for near, far in (((centre[0], centre[1] + 1), (centre[0], grid - 1)), ((centre[0] + 1, centre[1]), (grid - 1, centre[1]))):
        assert distance(centre, near) < distance(centre, far)
    assert len({tuple(row.tolist()) for row in positions[1:].detach()}) == grid * grid  # every patch has its own code


# a 27-pixel red square on patch (row 4, column 5) of the tiny tower's 12x12 grid: the projector pools it, with rows
# 4-5 x columns 4-5, into token (2, 2) of its 6x6 grid
SMALL_SQUARE = Scene(336, 336, (0, 0, 0), (Shape("square", "red", x=5 * 28 + 14, y=4 * 28 + 14, size=27),), texture_seed=0)
RED = 1 + list(COLOURS).index("red")


def test_every_patch_of_a_token_cell_learns_the_shape_owning_the_cell():
    processor = ImageProcessor(crop_size=336, shortest_edge=336)
    under_each_patch = patch_labels(SMALL_SQUARE, processor, patch_size=28, cell=1)["colour"].reshape(12, 12)
    assert list(zip(*np.nonzero(under_each_patch), strict=True)) == [(4, 5)] and under_each_patch[4, 5] == RED

    by_cell = patch_labels(SMALL_SQUARE, processor, patch_size=28)["colour"].reshape(12, 12)
    assert np.all(by_cell[4:6, 4:6] == RED) and np.count_nonzero(by_cell) == 4


def test_the_tower_learns_colour_on_every_patch_and_the_rest_on_the_patches_a_shape_owns():
    labels = {name: torch.from_numpy(value).long()
              for name, value in patch_labels(SMALL_SQUARE, ImageProcessor(crop_size=336, shortest_edge=336), patch_size=28).items()}
    logits = {name: torch.randn(144, classes, requires_grad=True) for name, classes in ATTRIBUTE_CLASSES.items()}
    gradients = dict(zip(logits, torch.autograd.grad(patch_loss(logits, labels), list(logits.values())), strict=True))

    owned = labels["colour"] > 0
    assert owned.sum() == 4
    assert gradients["colour"][~owned].abs().sum() > 0  # the background is a colour class: "no shape here"
    for name in ("shape", "position", "near"):
        assert gradients[name][~owned].abs().sum() == 0 and gradients[name][owned].abs().sum() > 0


def test_scene_symbols_stand_in_the_token_of_the_cell_holding_the_shape():
    labels = patch_labels(SMALL_SQUARE, ImageProcessor(crop_size=336, shortest_edge=336), patch_size=28)
    cells = {name: token_cells(value[None]) for name, value in labels.items()}
    assert cells["colour"].shape == (1, 36) and list(np.flatnonzero(cells["colour"][0])) == [2 * 6 + 2]

    symbols = SceneSymbols(hidden_size=16)(cells={name: torch.from_numpy(value).long() for name, value in cells.items()})
    background = symbols[0, 0]
    assert symbols.shape == (1, 36, 16)
    assert torch.equal(symbols[0, torch.arange(36) != 14], background.expand(35, 16)) and not torch.equal(symbols[0, 14], background)

