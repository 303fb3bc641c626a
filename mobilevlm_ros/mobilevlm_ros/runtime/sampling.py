"""Choosing the next token from logits: greedy, or temperature sampling narrowed by top-k / top-p."""

from dataclasses import dataclass

import torch

from mobilevlm_ros.errors import PromptError


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. `temperature` 0 is greedy (upstream's benchmark setting); `seed` makes sampling repeatable.

    `repetition_penalty` (CTRL-style, > 1 discourages) applies to the tokens of the current turn: the question and
    what has been generated. `stop` strings end the answer; the text is cut before them. Before `min_new_tokens`
    tokens EOS is never chosen (fixed-length answers make benchmark runs comparable, like transformers' option).
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise PromptError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise PromptError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if not self.temperature >= 0:
            raise PromptError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise PromptError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise PromptError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise PromptError("stop strings must not be empty")


class Sampler:
    """Applies one SamplingParams to a stream of logits, with its own random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def __call__(self, logits: torch.Tensor, context_ids: list[int]) -> int:
        """The next token id from `logits` [vocab], given the ids the repetition penalty looks at."""
        params = self.params
        logits = logits.float()
        if params.repetition_penalty != 1.0 and context_ids:
            logits = penalize_repetition(logits, context_ids, params.repetition_penalty)
        if params.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / params.temperature
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            logits = nucleus(logits, params.top_p)
        probs = torch.softmax(logits, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


def penalize_repetition(logits: torch.Tensor, ids: list[int], penalty: float) -> torch.Tensor:
    """Divide positive logits of seen tokens by `penalty`, multiply negative ones (CTRL, Keskar et al. 2019)."""
    seen = torch.tensor(sorted(set(ids)), device=logits.device)
    scores = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens whose probabilities first reach `top_p` together (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    outside = probs.cumsum(dim=-1) - probs >= top_p  # the nucleus was already full before this token
    return logits.masked_fill(torch.empty_like(outside).scatter_(0, order, outside), float("-inf"))
