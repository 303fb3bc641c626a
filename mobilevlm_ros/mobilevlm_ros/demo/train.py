"""`mobilevlm train`: MobileVLM's training recipe at tiny scale on the synthetic world, saved as an official checkpoint.

MobileVLM trains in two stages on top of a pretrained CLIP and MobileLLaMA; a tiny model has neither, so two
from-scratch pretraining steps come first:
  0a. vision tower: every patch feature predicts the colour, kind, position and nearness of the shape owning its
      token cell (dense labels from the world);
  0b. language model: the same questions, and the request for a caption, about scene symbols standing where the
      image will go (per token cell, learned embeddings of the attributes of the shape there): the LLM learns its
      lookups on exact tokens;
  1.  projector only, tower and LLM frozen: image -> caption (MobileVLM's pretraining stage): the projector learns
      to write image tokens the LLM reads like the symbols it learned on;
  2.  projector + LLM, tower frozen: instruction tuning on every question kind and on navigation, loss on the answer
      tokens only, in the "v1" template (MobileVLM's fine-tuning stage).
The tower is frozen after 0a, so its features are computed once for the scene pool and reused by stages 1 and 2.
Everything is seeded: the same seed on the same torch build gives the same checkpoint.
"""

import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from transformers import CLIPVisionConfig, DynamicCache

from mobilevlm_ros.demo.recipe import Recipe
from mobilevlm_ros.demo.world import (
    CAPTION_QUESTION,
    COLOURS,
    NAVIGATION_INSTRUCTIONS,
    POSITIONS,
    QUESTION_KINDS,
    SHAPES,
    Sample,
    Scene,
    caption,
    draw_shape,
    navigation_answer,
    navigation_sample,
    prompt_question,
    question,
    random_negative,
    random_scene,
    render,
)
from mobilevlm_ros.model.checkpoint import is_vision_key
from mobilevlm_ros.model.config import parse_config
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM
from mobilevlm_ros.model.preprocess import RESAMPLING, ImageProcessor, expand_to_square
from mobilevlm_ros.model.prompt import SYSTEM_PROMPT, SentencePieceTokenizer, answer_ids, prefix_ids, question_ids
from mobilevlm_ros.model.writer import LLAMA, checkpoint_config, write_checkpoint, write_preprocessor_config, write_tokenizer
from mobilevlm_ros.runtime.navigation import NAVIGATION_ACTIONS, NAVIGATION_PROMPT

logger = logging.getLogger(__name__)

TOWER_DIR = "clip-vit-demo"
VISION = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    image_size=336, patch_size=28, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=128,
)
LANGUAGE = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=2048, **LLAMA, pad_token_id=0, tie_word_embeddings=False,
)
VOCAB_SIZE = 512  # at most: the world's text may give fewer pieces
IGNORE = -100  # label of tokens without loss


# --- tokenizer and model ---------------------------------------------------------------------------------------------

def corpus(rng: random.Random, sentences: int = 4000) -> Iterator[str]:
    """Text of the world: the system prompt, captions, questions, answers and navigation prompts."""
    yield SYSTEM_PROMPT + " USER: ASSISTANT:"
    for _ in range(sentences):
        scene, sample = navigation_sample(rng)
        yield caption(scene)
        yield f"USER: {prompt_question(sample)} ASSISTANT: {sample.answer}"
        for kind in QUESTION_KINDS:
            if (asked := question(rng, scene, kind)) is not None:
                yield f"USER: {asked.question} ASSISTANT: {asked.answer}"


def demo_config(vocab_size: int) -> dict:
    """The demo checkpoint's config.json. The projector is v1's LDP: its stride-2 block halves the tiny tower's 12x12
    grid to 36 image tokens (LDPv2 would keep 144), so the 4-layer LLM searches a quarter as many tokens for the shape
    a question names."""
    return checkpoint_config({"vocab_size": vocab_size, **LANGUAGE}, TOWER_DIR, "ldpnet", VISION["hidden_size"])


def build_model(vocab_size: int, seed: int) -> MobileLlamaForCausalLM:
    torch.manual_seed(seed)
    config = parse_config(demo_config(vocab_size), Path("config.json"))
    model = MobileLlamaForCausalLM(config, CLIPVisionConfig(**VISION))
    init_grid_positions(model.vision_path.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight)
    return model


def grid_position_table(grid: int, width: int) -> torch.Tensor:
    """[grid * grid, width] 2-D sine-cosine codes of the patch grid (row codes, then column codes), as MAE uses."""
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    angles = [axis.flatten()[:, None] * frequencies for axis in (rows, columns)]
    return torch.cat([torch.cat([angle.sin(), angle.cos()], dim=1) for angle in angles], dim=1)


@torch.no_grad()
def init_grid_positions(position_embedding: torch.Tensor) -> None:
    """Start the tower's learned position embedding (row 0: the class token) from the grid's 2-D codes: from a random
    start a from-scratch tower does not know which patches are neighbours, and learns where a shape stands several
    times slower."""
    grid = VISION["image_size"] // VISION["patch_size"]
    position_embedding[0] = 0
    position_embedding[1:] = grid_position_table(grid, position_embedding.shape[1])


# --- data ------------------------------------------------------------------------------------------------------------

# What every patch feature of the tower learns to predict in stage 0a, about the shape covering the patch (0 = none):
# enough for the language model to find a shape by colour and kind and read where it is and how close.
PATCH_ATTRIBUTES = {
    "colour": lambda scene, shape: 1 + list(COLOURS).index(shape.colour),
    "shape": lambda scene, shape: 1 + SHAPES.index(shape.kind),
    "position": lambda scene, shape: 1 + POSITIONS.index(scene.position(shape)),
    "near": lambda scene, shape: 1 + scene.is_near(shape),
}
ATTRIBUTE_CLASSES = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "position": len(POSITIONS) + 1, "near": 3}


def patch_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stage 0a's loss: per PATCH_ATTRIBUTES name, [patches, classes] logits against [patches] labels.

    Colour is learned on every patch (its class 0 says no shape owns the cell); the kind, position and nearness only
    on the patches a shape owns. Averaged over all patches, their easy class 0 (the background, most of the patches)
    drowns the kind: the tower then barely tells circles, squares and triangles apart, and neither does the model."""
    owned = labels["colour"] > 0
    return sum(F.cross_entropy(logits[name], labels[name] if name == "colour" else labels[name].masked_fill(~owned, IGNORE),
                               ignore_index=IGNORE)
               for name in PATCH_ATTRIBUTES)


@dataclass
class Pool:
    """The training scenes, the square uint8 images the model sees of them (pad + resize done once) and their dense
    patch labels."""

    scenes: list[Scene]
    pixels: np.ndarray  # [N, S, S, 3] uint8
    labels: dict[str, np.ndarray]  # PATCH_ATTRIBUTES name -> [N, patches]


# The side, in patches, of the cell the projector pools into one image token (the LDP's stride-2 block).
TOKEN_CELL = 2


def patch_labels(scene: Scene, processor: ImageProcessor, patch_size: int, cell: int = TOKEN_CELL) -> dict[str, np.ndarray]:
    """PATCH_ATTRIBUTES of the shape owning each patch's token cell (the one covering most of the cell, if it covers
    a quarter of a patch), in the geometry of the processed image (same pad and resize, nearest-neighbour).

    Every patch of a cell learns the same shape, so the projector's pooling cannot dilute it: labelled with the shape
    under each patch alone, a small shape's token averaged it with background, and even PERFECT per-patch labels
    through the projector left held-out colour at chance after 500 stage-2 steps."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for index, shape in enumerate(scene.shapes, start=1):
        draw_shape(draw, shape, index)
    if processor.pad_to_square:
        mask = expand_to_square(mask, 0)
    mask = np.asarray(mask.resize((processor.crop_size, processor.crop_size), RESAMPLING.NEAREST))
    size, grid = patch_size * cell, processor.crop_size // (patch_size * cell)
    cells = mask.reshape(grid, size, grid, size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(cells == index).sum(axis=1) for index in range(len(scene.shapes) + 1)], axis=1)
    owner = counts[:, 1:].argmax(axis=1) + 1 if len(scene.shapes) else np.zeros(len(cells), dtype=int)
    covered = counts[np.arange(len(cells)), owner] >= patch_size * patch_size / 4
    owner = np.where(covered, owner, 0).reshape(grid, grid).repeat(cell, axis=0).repeat(cell, axis=1).flatten()
    return {name: np.array([0] + [value(scene, shape) for shape in scene.shapes])[owner]
            for name, value in PATCH_ATTRIBUTES.items()}


def pool_entry(scene: Scene, processor: ImageProcessor, patch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The square uint8 image of `scene` the model sees, and its patch labels."""
    return np.asarray(processor.square(render(scene))), patch_labels(scene, processor, patch_size)


def make_pool(count: int, seed: int, processor: ImageProcessor, patch_size: int) -> Pool:
    """`count` scenes: two thirds drawn freely, one third built around a navigation target (some of them near).
    The scenes are drawn here, in order; rendering them is spread over the CPU's cores (a minute on one core)."""
    rng = random.Random(seed)
    scenes = [navigation_sample(rng)[0] if index % 3 == 2 else random_scene(rng) for index in range(count)]
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as workers:
        entries = list(workers.map(partial(pool_entry, processor=processor, patch_size=patch_size), scenes, chunksize=64))
    return Pool(scenes, np.stack([pixels for pixels, _ in entries]),
                {name: np.stack([labels[name] for _, labels in entries]) for name in PATCH_ATTRIBUTES})


def token_cells(labels: np.ndarray) -> np.ndarray:
    """[N, grid * grid] patch labels (`patch_labels`) -> [N, cells] labels of the token cells, in the order of the
    projector's tokens."""
    grid = VISION["image_size"] // VISION["patch_size"]
    return labels.reshape(-1, grid, grid)[:, ::TOKEN_CELL, ::TOKEN_CELL].reshape(len(labels), -1)


class SceneSymbols(nn.Module):
    """Stage 0b's image: per token cell, the sum of learned embeddings of the attributes of the shape owning it.

    The LLM learns its lookups (which token holds the circle, what colour it has, is there one that is both blue and
    a square) on these exact tokens; stage 1 then only has to teach the projector to write tokens the LLM reads like
    them, cell by cell, and after it the projector's tokens serve the LLM nearly as well as the symbols. Learned from
    real projector tokens instead, the lookups came or did not come depending on the seed. Used in training only: not
    in the checkpoint.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.embeddings = nn.ModuleDict({name: nn.Embedding(classes, hidden_size) for name, classes in ATTRIBUTE_CLASSES.items()})
        for embedding in self.embeddings.values():
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, cells: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(embedding(cells[name]) for name, embedding in self.embeddings.items())


# The question mix of stages 0b and 2: existence and navigation, the two that must match a colour AND a shape on one
# object, twice as often as the rest, and a third of the existence questions about an object unrelated to the scene.
# With POPE's adversarial negatives alone (a present colour with another shape, or the reverse) the tiny LLM stays at
# chance on existence even with perfect, symbolic, image tokens, and the easy negatives give it a first foothold.
# Navigation at the plain rate misses the target among shapes of its kind far more often than twice as often.
TRAINING_KINDS = QUESTION_KINDS + ("existence", "navigation", "navigation")
RANDOM_NEGATIVES = 1 / 3


def draw_questions(rng: random.Random, scene: Scene, count: int) -> list[Sample]:
    """`count` questions about `scene`, their kinds drawn from TRAINING_KINDS."""
    samples: list[Sample] = []
    while len(samples) < count:
        kind = rng.choice(TRAINING_KINDS)
        if kind == "navigation":
            target = rng.choice(scene.shapes) if rng.random() < 0.75 else None
            colour, shape = (target.colour, target.kind) if target else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
            instruction = rng.choice(NAVIGATION_INSTRUCTIONS)
            samples.append(Sample(kind, instruction.format(n=f"{colour} {shape}"), navigation_answer(scene, colour, shape)))
        elif kind == "existence" and rng.random() < RANDOM_NEGATIVES:
            samples.append(random_negative(rng, scene))
        elif (sample := question(rng, scene, kind)) is not None:
            samples.append(sample)
    return samples


def describe(scene: Scene) -> Sample:
    """The caption request of stage 1 (MobileVLM's pretraining data is image -> caption)."""
    return Sample("caption", CAPTION_QUESTION, caption(scene))


def turn(tokenizer: SentencePieceTokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """Token ids of one question and answer right after the image, and their labels (the answer and its EOS)."""
    asked = question_ids(tokenizer, prompt_question(sample))
    answered = answer_ids(tokenizer, sample.answer)
    return asked + answered, [IGNORE] * len(asked) + answered


def pad(rows: list[list[int]], value: int, device: torch.device | str = "cpu") -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long, device=device)


# --- training --------------------------------------------------------------------------------------------------------

def schedule(step: int, steps: int, warmup: int = 20) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def optimize(
    name: str, parameters: list[nn.Parameter], steps: int, learning_rate: float, loss_of_step: Callable[[int], torch.Tensor]
) -> float:
    """AdamW over `parameters` for `steps` steps; logs the running loss and returns the last one."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, steps))
    started, running = time.perf_counter(), float("nan")
    for step in range(steps):
        loss = loss_of_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        running = loss.item() if math.isnan(running) else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f (%.0f s)", name, step + 1, steps, running, time.perf_counter() - started)
    return running


def language_loss(model: MobileLlamaForCausalLM, prefix: torch.Tensor, images: torch.Tensor, turns: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions of the `turns` rows, each one question and its answer
    (right padding needs no mask: it only follows).

    Every row follows the prompt `prefix` (the system prompt, the same for the whole batch) and an image of `images`
    [B, tokens, hidden]: rows b*k .. b*k+k-1 (k = rows / B) are k questions about image b. As a Session asks them,
    each question branches off the image instead of following the previous answer: with five questions in one
    conversation the tiny LLM must also learn which question is the current one, and learns the lookups far slower. The
    prefix and each image run once and their keys and values are shared by the rows that follow them: the loss and
    gradients are those of the full rows, for a fraction of the compute.
    """
    cache, decoder = DynamicCache(config=model.config), model.base_model
    decoder(inputs_embeds=model.get_input_embeddings()(prefix)[None], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(images.shape[0])
    decoder(inputs_embeds=images, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(turns.shape[0] // images.shape[0])
    hidden = decoder(inputs_embeds=turns, past_key_values=cache, use_cache=True).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def train(out_dir: str | Path, recipe: Recipe = Recipe(), device: torch.device | str = "cpu") -> Path:
    """Run the whole recipe on `device` and write the checkpoint to `out_dir` (replaced if it exists). The weights
    start identical on every device; a GPU then gives a checkpoint close to, not bit-equal with, the CPU's."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_tokenizer(work / "tokenizer.model", corpus(random.Random(recipe.seed)), VOCAB_SIZE)
    tokenizer = SentencePieceTokenizer(work / "tokenizer.model")
    vocab_size = tokenizer.sp.get_piece_size()
    model = build_model(vocab_size, recipe.seed).to(device)
    processor = ImageProcessor(crop_size=VISION["image_size"], shortest_edge=VISION["image_size"])
    pool = make_pool(recipe.scenes, recipe.seed, processor, VISION["patch_size"])
    logger.info("vocabulary %d, %d parameters, pool of %d scenes (%.0f s)",
                vocab_size, sum(p.numel() for p in model.parameters()), len(pool.scenes), time.perf_counter() - started)
    rng = random.Random(recipe.seed + 1)
    vision = model.vision_path
    tower, projector, embed = vision.vision_tower, vision.mm_projector, model.get_input_embeddings()
    prefix = torch.tensor(prefix_ids(tokenizer), device=device)

    def pixel_values(indices: list[int] | slice) -> torch.Tensor:
        return processor.normalize(pool.pixels[indices]).to(device)

    def batch_indices() -> list[int]:
        return [rng.randrange(len(pool.scenes)) for _ in range(recipe.batch_size)]

    def questions_loss(images_of: Callable[[list[int]], torch.Tensor], samples_of: Callable[[Scene], list[Sample]]) -> torch.Tensor:
        """The language loss of a batch of scenes: the samples of each scene, each its own row after the scene's image."""
        indices = batch_indices()
        turns = [turn(tokenizer, sample) for index in indices for sample in samples_of(pool.scenes[index])]
        return language_loss(model, prefix, images_of(indices), embed(pad([ids for ids, _ in turns], 0, device)),
                             pad([labels for _, labels in turns], IGNORE, device))

    # 0a. vision tower: dense labels of the shape owning each patch's token cell
    heads = nn.ModuleDict({name: nn.Linear(VISION["hidden_size"], classes) for name, classes in ATTRIBUTE_CLASSES.items()}).to(device)

    def vision_loss(step: int) -> torch.Tensor:
        indices = batch_indices()
        features = tower(pixel_values(indices)).flatten(0, 1)
        return patch_loss({name: head(features) for name, head in heads.items()},
                          {name: torch.from_numpy(pool.labels[name][indices]).to(device).long().flatten() for name in heads})

    optimize("0a vision", [*tower.parameters(), *heads.parameters()], recipe.vision_steps, recipe.vision_learning_rate, vision_loss)
    tower.requires_grad_(False).eval()
    with torch.no_grad():
        features = torch.cat([tower(pixel_values(slice(i, i + 64))) for i in range(0, len(pool.scenes), 64)])

    def projected(indices: list[int]) -> torch.Tensor:
        return projector(features[indices])

    # 0b. language model: questions about scene symbols in place of the image, and the caption requested from them
    language_parameters = [p for n, p in model.named_parameters() if not is_vision_key(n)]
    symbols = SceneSymbols(LANGUAGE["hidden_size"]).to(device)

    def scene_symbols(indices: list[int]) -> torch.Tensor:
        return symbols({name: torch.from_numpy(token_cells(labels[indices])).to(device).long() for name, labels in pool.labels.items()})

    optimize("0b language", [*language_parameters, *symbols.parameters()], recipe.text_steps, recipe.learning_rate,
             lambda step: questions_loss(
                 scene_symbols, lambda scene: [*draw_questions(rng, scene, recipe.questions_per_image - 1), describe(scene)]))

    # 1. projector only: image -> caption
    model.requires_grad_(False)
    projector.requires_grad_(True)
    optimize("1 align", list(projector.parameters()), recipe.align_steps, recipe.learning_rate,
             lambda step: questions_loss(projected, lambda scene: [describe(scene)]))

    # 2. projector + LLM: instructions and navigation
    for parameter in language_parameters:
        parameter.requires_grad_(True)
    loss = optimize("2 instruct", [*projector.parameters(), *language_parameters], recipe.instruct_steps, recipe.instruct_learning_rate,
                    lambda step: questions_loss(projected, lambda scene: draw_questions(rng, scene, recipe.questions_per_image)))

    write_checkpoint(work, demo_config(vocab_size), VISION, model.state_dict())
    write_preprocessor_config(work / TOWER_DIR, VISION["image_size"])
    (work / "training.json").write_text(json.dumps({
        "recipe": recipe.__dict__, "final_loss": loss, "seconds": round(time.perf_counter() - started),
        "torch": torch.__version__, "navigation_prompt": NAVIGATION_PROMPT, "navigation_actions": NAVIGATION_ACTIONS,
    }, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)
    logger.info("wrote %s in %.0f s", out_dir, time.perf_counter() - started)
    return out_dir

