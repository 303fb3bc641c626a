"""Choosing the next token from logits."""

from dataclasses import dataclass

import torch

from mobilevlm_ros.errors import PromptError


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: `temperature` 0 is greedy (upstream's benchmark setting); `seed` makes sampling repeatable."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise PromptError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise PromptError(f"temperature must be >= 0, got {self.temperature}")


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """Greedy when temperature is 0, else a draw from softmax(logits / temperature). `logits` is [vocab]."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
