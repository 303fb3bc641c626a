"""The knobs of `mobilevlm train` (no torch here, so the CLI can list them without loading it)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    scenes: int = 6000  # the training pool; questions are drawn afresh from it at every step
    batch_size: int = 32
    turns: int = 5  # questions per image in stage 2 (a "v1" conversation, like LLaVA's multi-turn samples)
    vision_steps: int = 250
    text_steps: int = 250
    align_steps: int = 150
    instruct_steps: int = 2000
    learning_rate: float = 1e-3
    instruct_learning_rate: float = 1e-3
