"""Sessions: one frame, encoded and prefilled once, then any number of questions or choices about it.

The "v1" prompt splits at the image: [BOS] + "{system} USER: " + <image> is the same for every question, so it is
prefilled once (an overview and its tiles are several images with text between them, prefilled alike); each
question appends only "\\n{question} ASSISTANT:" (exactly upstream's tokenization of the text after `<image>`) and
truncates back afterwards. With `keep_history` the answers stay in the cache and the next question continues the
conversation ("...ASSISTANT: {answer}</s>USER: {question} ASSISTANT:").
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from mobilevlm_ros.errors import PromptError
from mobilevlm_ros.model.prompt import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, Tokenizer, answer_ids, image_prefix_ids, question_ids
from mobilevlm_ros.runtime.language import LanguageBackend, check_room
from mobilevlm_ros.runtime.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int  # everything the answer was conditioned on: prefix, image, history and question
    generated_tokens: int
    interrupted: bool = False  # should_stop() ended it before EOS or the token limit
    mean_logprob: float = 0.0  # the model's mean log-probability of the answer's tokens (and its EOS): its confidence
    box: tuple[int, int, int, int] | None = None  # the part of the frame answered about (crop, per_tile); None = all


@dataclass(frozen=True)
class Choice:
    option: str  # always one of the options given
    confidence: float  # softmax of the scores: the model's probability of this option among the options
    scores: dict[str, float]  # log-likelihood of each option's whole token sequence (with the closing EOS)


class Session:
    def __init__(self, backend: LanguageBackend, tokenizer: Tokenizer, image_embeds: torch.Tensor, keep_history: bool = False,
                 image_text: str = IMAGE_PLACEHOLDER):
        """`image_embeds` [num_image_tokens, hidden] (or [num_images, num_image_tokens, hidden] for an `image_text`
        with that many `<image>`s) are prefilled after the system prompt right away."""
        self.tokenizer = tokenizer
        self.keep_history = keep_history
        self.context_length = backend.context_length
        self.cache = backend.new_cache()
        images = image_embeds if image_embeds.dim() == 3 else image_embeds[None]
        ids = image_prefix_ids(tokenizer, image_text)
        placeholders = [i for i, token in enumerate(ids) if token == IMAGE_TOKEN_INDEX]
        if len(placeholders) != len(images):
            raise PromptError(f"{len(placeholders)} images in {image_text!r} for {len(images)} image embeddings")
        start = 0
        for image, position in zip(images, placeholders, strict=True):
            if position > start:
                self.cache.append_tokens(ids[start:position])
            self.cache.append_embeds(image)
            start = position + 1
        self.prefix_length = self.cache.length
        self.token_logprobs: list[torch.Tensor] = []  # the current (or last) answer's, one per generated token and EOS
        self._unfed: list[int] = []  # history mode: the tail of the last answer not yet in the cache
        self.prompt_tokens = 0  # tokens the current (or last) turn is conditioned on

    def _question_ids(self, question: str) -> list[int]:
        if self.cache.length == self.prefix_length:
            return question_ids(self.tokenizer, question)
        return self._unfed + [self.tokenizer.eos_id] + question_ids(self.tokenizer, question, first=False)

    def _start_turn(self, question: str) -> tuple[list[int], torch.Tensor]:
        """Append the question (after the history, or right after the image) and return its ids and next-token logits."""
        if not self.keep_history:
            self.cache.truncate(self.prefix_length)
        ids = self._question_ids(question)
        check_room(self.cache, len(ids) + 1, self.context_length)
        logits = self.cache.append_tokens(ids)
        self._unfed = []
        self.prompt_tokens = self.cache.length
        self.token_logprobs = []
        return ids, logits

    def generate(self, question: str, params: SamplingParams = SamplingParams()) -> Iterator[int]:
        """Token ids of the answer as they are sampled; stops at EOS (not yielded), the token limit or the context end."""
        question_ids, logits = self._start_turn(question)
        sampler, turn_ids, unfed = Sampler(params), list(question_ids), []
        try:
            for step in range(params.max_new_tokens):
                model_logits = logits
                if step < params.min_new_tokens:
                    logits = logits.index_fill(0, torch.tensor([self.tokenizer.eos_id], device=logits.device), float("-inf"))
                token = sampler(logits, turn_ids)
                self.token_logprobs.append(torch.log_softmax(model_logits.float(), dim=-1)[token])  # no sync: read at the end
                if token == self.tokenizer.eos_id:
                    return
                unfed = [token]
                yield token
                turn_ids.append(token)
                # Leave room for the token and, in a conversation, the EOS that closes the answer.
                if step + 1 == params.max_new_tokens or self.cache.length + 2 > self.context_length:
                    return
                logits = self.cache.append_tokens([token])
                unfed = []
        finally:
            self._unfed = unfed

    def stream(self, question: str, params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """The answer as text pieces, as soon as they are final; joined they equal `ask(...).text`."""
        text = TextAssembler(self.tokenizer, params.stop)
        for token in self.generate(question, params):
            if piece := text.add(token):
                yield piece
            if text.stopped:
                return
        if piece := text.finish():
            yield piece

    def ask(
        self,
        question: str,
        params: SamplingParams = SamplingParams(),
        on_text: Callable[[str, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Answer:
        """Answer `question`. `on_text(text so far, tokens so far)` sees the answer grow; `should_stop()` is asked
        after every token and ends generation early (for cancel and timeouts), leaving `Answer.interrupted` set."""
        text = TextAssembler(self.tokenizer, params.stop)
        interrupted = False
        for token in self.generate(question, params):
            if text.add(token) and on_text:
                on_text(text.emitted, len(text.ids))
            if text.stopped:
                break
            if should_stop and should_stop():
                interrupted = True
                break
        if text.finish() and on_text:
            on_text(text.emitted, len(text.ids))
        return Answer(text.emitted, self.prompt_tokens, len(text.ids), interrupted, self.mean_logprob)

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability the model gave the last answer's tokens (with its EOS when it ended there), under the
        model's own distribution (before temperature or penalties); 0.0 before any token."""
        if not self.token_logprobs:
            return 0.0
        return float(torch.stack(self.token_logprobs).mean())

    def choose(self, instruction: str, options: list[str]) -> Choice:
        """Score every option as the answer to `instruction`; the best one wins. Never returns text outside `options`."""
        if not options:
            raise PromptError("options are empty")
        if any(not option or not option.strip() for option in options):
            raise PromptError("an option is empty")
        if len(set(options)) != len(options):
            raise PromptError(f"options repeat: {sorted(o for o in set(options) if options.count(o) > 1)}")
        history = (self.cache.length, self._unfed)
        _, logits = self._start_turn(instruction)
        base = self.cache.length
        scores = {}
        for option in options:
            ids = answer_ids(self.tokenizer, option)
            check_room(self.cache, len(ids), self.context_length)
            following = self.cache.append_tokens(ids, all_logits=True)
            step_logits = torch.cat([logits[None], following[:-1]])
            scores[option] = float(torch.log_softmax(step_logits, dim=-1)[torch.arange(len(ids)), ids].sum())
            self.cache.truncate(base)
        if self.keep_history:  # a choice is not part of the conversation
            self.cache.truncate(history[0])
            self._unfed = history[1]
        best = max(scores, key=scores.get)
        total = math.fsum(math.exp(score - scores[best]) for score in scores.values())
        return Choice(best, 1.0 / total, scores)


class PerTileSession:
    """`per_tile`: the question is asked about each tile of a frame on its own, and the answer the model is most sure
    of (highest mean token log-probability) wins. The tiles are encoded once; each question opens one tile's session
    at a time (llama.cpp holds only a few), so only the vision work is shared between questions."""

    def __init__(self, backend: LanguageBackend, tokenizer: Tokenizer, tile_embeds: torch.Tensor,
                 boxes: list[tuple[int, int, int, int]]):
        """`tile_embeds` [num_tiles, num_image_tokens, hidden]; `boxes` where each tile lies in the frame."""
        if len(tile_embeds) != len(boxes):
            raise ValueError(f"{len(tile_embeds)} tile embeddings for {len(boxes)} boxes")
        self.backend, self.tokenizer = backend, tokenizer
        self.tile_embeds, self.boxes = tile_embeds, boxes

    def ask(
        self,
        question: str,
        params: SamplingParams = SamplingParams(),
        on_text: Callable[[str, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Answer:
        """The most confident tile's answer, with the tile's `box`; `on_text` sees only the winner, once it is known.
        When `should_stop()` interrupts a tile, that partial answer comes back (interrupted)."""
        best = None
        for embeds, box in zip(self.tile_embeds, self.boxes, strict=True):
            answer = replace(Session(self.backend, self.tokenizer, embeds).ask(question, params, should_stop=should_stop), box=box)
            if answer.interrupted:
                return answer
            if best is None or answer.mean_logprob > best.mean_logprob:
                best = answer
        if on_text and best.text:
            on_text(best.text, best.generated_tokens)
        return best


class TextAssembler:
    """Token ids -> text pieces that never need taking back: an unfinished UTF-8 character, trailing whitespace and
    a tail that may be the start of a stop string wait for the next token (or `finish`). The text is stripped, as
    upstream strips its answers, and cut before the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        self.ids.append(token)
        text = self._decoded()
        return self._emit(text if self.stopped else self._settled(text))

    def finish(self) -> str:
        """No more tokens: whatever was held back, except trailing whitespace, is final."""
        return self._emit(self._decoded())

    def _decoded(self) -> str:
        text = self.tokenizer.decode(self.ids).lstrip()
        for stop in self.stop:
            cut = text.find(stop)
            if cut != -1:
                text, self.stopped = text[:cut], True
        return text

    def _emit(self, final: str) -> str:
        final = final.rstrip()
        piece = final[len(self.emitted):] if final.startswith(self.emitted) else ""
        self.emitted += piece
        return piece

    def _settled(self, text: str) -> str:
        """The prefix of `text` that no later token can change."""
        text = text.rstrip("\ufffd")
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    text = text[:-size]
                    break
        return text
