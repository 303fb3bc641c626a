"""`mobilevlm train` at micro scale: the recipe runs end to end, is seeded, and writes an official checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mobilevlm_ros.demo.recipe import Recipe
from mobilevlm_ros.demo.train import IGNORE, TOWER_DIR, build_model, language_loss, train
from mobilevlm_ros.runtime.vlm import MobileVLM

MICRO = Recipe(scenes=8, batch_size=2, turns=1, vision_steps=2, text_steps=2, align_steps=2, instruct_steps=2)
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


def test_the_shared_prompt_prefix_gives_the_loss_and_gradients_of_the_full_rows():
    model = build_model(vocab_size=64, seed=0)
    prefix = torch.tensor([1, 5, 9, 12, 7])
    rows = torch.randn(3, 8, model.config.hidden_size)
    labels = torch.randint(3, 64, (3, 8))
    labels[:, :2] = IGNORE
    labels[2, 6:] = IGNORE  # a shorter, right-padded row

    shared = language_loss(model, prefix, rows, labels)
    (shared_grad,) = torch.autograd.grad(shared, model.model.layers[0].self_attn.q_proj.weight)

    embed = model.model.embed_tokens
    hidden = model.model(inputs_embeds=torch.cat([embed(prefix).expand(3, -1, -1), rows], dim=1)).last_hidden_state
    logits = model.lm_head(hidden[:, len(prefix):-1])
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    (full_grad,) = torch.autograd.grad(full, model.model.layers[0].self_attn.q_proj.weight)

    assert torch.allclose(shared, full, atol=1e-6)
    assert torch.allclose(shared_grad, full_grad, atol=1e-7, rtol=1e-4)
