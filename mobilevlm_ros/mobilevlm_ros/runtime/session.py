"""Sessions: one frame, encoded and prefilled once, then any number of questions or choices about it.

The "v1" prompt splits at the image: [BOS] + "{system} USER: " + <image> is the same for every question, so it is
prefilled once; each question appends only "\\n{question} ASSISTANT:" (exactly upstream's tokenization of the text
after `<image>`) and truncates back afterwards. With `keep_history` the answers stay in the cache and the next
question continues the conversation ("...ASSISTANT: {answer}</s>USER: {question} ASSISTANT:").
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mobilevlm_ros.errors import PromptError
from mobilevlm_ros.model.prompt import Tokenizer, answer_ids, prefix_ids, question_ids
from mobilevlm_ros.runtime.language import LanguageBackend, check_room
from mobilevlm_ros.runtime.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int  # everything the answer was conditioned on: prefix, image, history and question
    generated_tokens: int
    interrupted: bool = False  # should_stop() ended it before EOS or the token limit


@dataclass(frozen=True)
class Choice:
    option: str  # always one of the options given
    confidence: float  # softmax of the scores: the model's probability of this option among the options
    scores: dict[str, float]  # log-likelihood of each option's whole token sequence (with the closing EOS)


class Session:
    def __init__(self, backend: LanguageBackend, tokenizer: Tokenizer, image_embeds: torch.Tensor, keep_history: bool = False):
        """`image_embeds` [num_image_tokens, hidden] are prefilled after the system prompt right away."""
        self.tokenizer = tokenizer
        self.keep_history = keep_history
        self.context_length = backend.context_length
        self.cache = backend.new_cache()
        self.cache.append_tokens(prefix_ids(tokenizer))
        self.cache.append_embeds(image_embeds)
        self.prefix_length = self.cache.length
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
        return ids, logits

    def generate(self, question: str, params: SamplingParams = SamplingParams()) -> Iterator[int]:
        """Token ids of the answer as they are sampled; stops at EOS (not yielded), the token limit or the context end."""
        question_ids, logits = self._start_turn(question)
        sampler, turn_ids, unfed = Sampler(params), list(question_ids), []
        try:
            for step in range(params.max_new_tokens):
                if step < params.min_new_tokens:
                    logits = logits.index_fill(0, torch.tensor([self.tokenizer.eos_id], device=logits.device), float("-inf"))
                token = sampler(logits, turn_ids)
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
        return Answer(text.emitted, self.prompt_tokens, len(text.ids), interrupted)

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
