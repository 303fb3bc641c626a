"""The knobs of `mobilevlm train` (no torch here, so the CLI can list them without loading it)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    scenes: int = 6000  # the training pool; questions are drawn afresh from it at every step
    batch_size: int = 32
    # rows per image in stages 0b (one of them the caption request) and 2; each branches off the image as a Session asks
    questions_per_image: int = 5
    vision_steps: int = 2000  # its slowest lesson, the kind of a shape: a probe reads it on 0.92 of held-out shape patches by then
    text_steps: int = 1200  # on scene symbols: the lookups take the tiny LLM ~1000-1500 steps even on exact tokens
    align_steps: int = 300
    instruct_steps: int = 1000
    vision_learning_rate: float = 2e-3
    learning_rate: float = 1e-3
    instruct_learning_rate: float = 1e-3
