"""Sessions: prefix reuse, streaming, history and constrained choice, each checked against recomputing from scratch."""

import math

import numpy as np
import pytest

from mobilevlm_ros.errors import PromptError
from mobilevlm_ros.model.prompt import IMAGE_TOKEN_INDEX, SYSTEM_PROMPT
from mobilevlm_ros.runtime.language import TorchLanguageModel
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import TextAssembler
from mobilevlm_ros.runtime.vlm import MobileVLM
from reference import greedy_tokens, option_scores
from tiny_checkpoint import CONTEXT_LENGTH, IMAGE_TOKENS

QUESTION = "What is in the image?"
ACTIONS = ["move_forward", "turn_left", "turn_right", "stop"]
SCORE_TOLERANCE = 1e-3  # fp32 log-likelihoods of a few tokens, cached against uncached


@pytest.fixture(scope="module", params=["dynamic", "static"])
def vlm(checkpoint, request) -> MobileVLM:
    """On the CPU's default dynamic caches, and on CUDA's default: one static buffer shared by every session (without
    the CUDA graph here), so every check below also holds where sessions take turns in one buffer."""
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu")
    if request.param == "static":
        vlm.language = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    return vlm


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (120, 200, 3), dtype=np.uint8)


def with_image(vlm: MobileVLM, after_image: list[int]) -> list[int]:
    """[BOS, system prompt, "USER: ", image placeholder] followed by `after_image`, the ids of what comes after it."""
    return [vlm.tokenizer.bos_id] + vlm.tokenizer.encode(f"{SYSTEM_PROMPT} USER: ") + [IMAGE_TOKEN_INDEX] + after_image


def test_session_tokens_are_upstreams_prompt(vlm, image):
    """Prefix + question ids equal the whole prompt tokenized with upstream's rule: the session scores answers as one
    pass over that prompt does, and counts its tokens (the placeholder becomes the image's tokens)."""
    ids = vlm.prompt_ids(QUESTION)
    session = vlm.session(image)
    choice = session.choose(QUESTION, ACTIONS)
    assert choice.scores == pytest.approx(option_scores(vlm, ids, vlm.encode_image(image), ACTIONS), abs=SCORE_TOLERANCE)
    assert session.prompt_tokens == len(ids) - 1 + IMAGE_TOKENS


def test_cached_greedy_equals_recomputing_everything(vlm, image):
    session = vlm.session(image)
    ours = list(session.generate(QUESTION, SamplingParams(max_new_tokens=10)))
    question = vlm.tokenizer.encode(f"\n{QUESTION} ASSISTANT:")
    assert ours == greedy_tokens(vlm, with_image(vlm, question), vlm.encode_image(image), 10)


def test_reused_session_answers_like_a_fresh_one(vlm, image):
    session = vlm.session(image)
    params = SamplingParams(max_new_tokens=8)
    first = session.ask("How many shapes?", params)
    second = session.ask("What colour is it?", params)
    assert second == vlm.session(image).ask("What colour is it?", params)
    assert first == vlm.session(image).ask("How many shapes?", params)
    assert session.cache.length > session.prefix_length  # the last question is still there until the next one


def test_stream_joins_to_the_answer(vlm, image):
    params = SamplingParams(max_new_tokens=12)
    session = vlm.session(image)
    pieces = list(session.stream("Describe the scene.", params))
    assert "".join(pieces) == session.ask("Describe the scene.", params).text
    assert len(pieces) > 1


def test_stop_string_cuts_the_answer(vlm, image):
    session = vlm.session(image)
    full = session.ask("Describe the scene.", SamplingParams(max_new_tokens=16)).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    params = SamplingParams(max_new_tokens=16, stop=(stop,))
    cut = session.ask("Describe the scene.", params).text
    assert cut == full[: full.index(stop)].strip()
    assert "".join(session.stream("Describe the scene.", params)) == cut


def test_eos_ends_the_answer(vlm, image):
    session = vlm.session(image)
    tokens = list(session.generate("Describe the scene.", SamplingParams(max_new_tokens=12)))
    vlm.tokenizer.eos_id, original = tokens[3], vlm.tokenizer.eos_id
    try:
        stopped = list(session.generate("Describe the scene.", SamplingParams(max_new_tokens=12)))
    finally:
        vlm.tokenizer.eos_id = original
    assert stopped == tokens[: tokens.index(tokens[3])]


def test_answer_counts(vlm, image):
    session = vlm.session(image)
    answer = session.ask("Describe the scene.", SamplingParams(max_new_tokens=5))
    question = vlm.tokenizer.encode("\nDescribe the scene. ASSISTANT:")
    assert (answer.prompt_tokens, answer.generated_tokens) == (session.prefix_length + len(question), 5)


def test_history_continues_upstreams_conversation_template(vlm, image):
    session = vlm.session(image, keep_history=True)
    params = SamplingParams(max_new_tokens=4)
    first = list(session.generate("How many shapes?", params))
    second = list(session.generate("And their colour?", params))
    tok = vlm.tokenizer
    # "...USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:", with a1 the generated ids.
    history = tok.encode("\nHow many shapes? ASSISTANT:") + first + [tok.eos_id] + tok.encode("USER: And their colour? ASSISTANT:")
    assert second == greedy_tokens(vlm, with_image(vlm, history), vlm.encode_image(image), 4)


def test_choose_ranks_like_brute_force_scoring(vlm, image):
    choice = vlm.session(image).choose("Go to the red square.", ACTIONS)
    question = vlm.tokenizer.encode("\nGo to the red square. ASSISTANT:")
    expected = option_scores(vlm, with_image(vlm, question), vlm.encode_image(image), ACTIONS)
    assert choice.scores.keys() == expected.keys()
    assert choice.scores == pytest.approx(expected, abs=SCORE_TOLERANCE)
    assert choice.option == max(expected, key=expected.get)
    probabilities = [math.exp(s) for s in choice.scores.values()]
    assert sum(p / sum(probabilities) for p in probabilities) == pytest.approx(1.0)
    assert choice.confidence == pytest.approx(max(probabilities) / sum(probabilities))


def test_choose_only_returns_given_options_and_leaves_the_session_usable(vlm, image):
    session = vlm.session(image, keep_history=True)
    session.ask("How many shapes?", SamplingParams(max_new_tokens=3))
    length = session.cache.length
    for options in (["yes", "no"], ["a red circle", "a blue square", "nothing"], ["left"]):
        choice = session.choose("Which one?", options)
        assert choice.option in options
        assert session.cache.length == length
    assert vlm.session(image).choose("Which one?", ["left"]).confidence == 1.0


@pytest.mark.parametrize("options, message", [
    ([], "options are empty"),
    (["stop", ""], "an option is empty"),
    (["stop", "  "], "an option is empty"),
    (["stop", "turn_left", "stop"], r"options repeat: \['stop'\]"),
])
def test_bad_options(vlm, image, options, message):
    with pytest.raises(PromptError, match=message):
        vlm.session(image).choose("Go.", options)


def test_prompt_longer_than_the_context_names_the_limit(vlm, image):
    session = vlm.session(image)
    with pytest.raises(PromptError, match=rf"prompt is \d+ tokens with the image; the context holds {CONTEXT_LENGTH}"):
        session.ask("why " * CONTEXT_LENGTH)
    with pytest.raises(PromptError, match=f"the context holds {CONTEXT_LENGTH}"):
        session.choose("why " * CONTEXT_LENGTH, ["yes", "no"])
    assert session.ask("Still fine?", SamplingParams(max_new_tokens=2)).generated_tokens <= 2


def test_generation_stops_at_the_end_of_the_context(vlm, image):
    session = vlm.session(image)

    def room(question: str) -> int:
        return CONTEXT_LENGTH - session.prefix_length - len(vlm.tokenizer.encode(f"\n{question} ASSISTANT:"))

    words = 1
    while room("word " * (words + 1)) > 4:
        words += 1
    question = "word " * words
    answer = session.ask(question, SamplingParams(max_new_tokens=500))
    assert 0 < answer.generated_tokens <= room(question)


def test_empty_question(vlm, image):
    with pytest.raises(PromptError, match="question is empty"):
        vlm.session(image).ask("  ")
    with pytest.raises(PromptError, match="question is empty"):
        vlm.ask("not even an image", " ")


def test_bgr_frames_give_the_rgb_answer(vlm, image):
    rgb = vlm.ask(image, "What colour?", max_new_tokens=6)
    assert vlm.ask(image[:, :, ::-1].copy(), "What colour?", max_new_tokens=6, channel_order="bgr") == rgb


def test_text_assembler_holds_back_partial_characters_and_stop_prefixes(tokenizer_model):
    from mobilevlm_ros.model.prompt import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tokenizer_model)
    text = "Turn left é then STOP here"
    ids = tokenizer.encode(text)
    assembler = TextAssembler(tokenizer, stop=("STOP",))
    pieces = []
    for token in ids:
        pieces.append(assembler.add(token))
        assert "\ufffd" not in "".join(pieces) and "ST" not in "".join(pieces)
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    assert "".join(pieces) == "Turn left é then"


def test_ask_reports_progress_and_can_be_interrupted(vlm, image):
    session = vlm.session(image)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12)
    seen: list[tuple[str, int]] = []
    full = session.ask("Describe the scene.", params, on_text=lambda text, count: seen.append((text, count)))
    assert seen and seen[-1][0] == full.text and not full.interrupted
    assert all(full.text.startswith(text) for text, _ in seen)
    assert [count for _, count in seen] == sorted(count for _, count in seen)

    calls = []
    stopped = session.ask("Describe the scene.", params, should_stop=lambda: calls.append(1) or len(calls) >= 3)
    assert stopped.interrupted and stopped.generated_tokens == 3
    assert full.text.startswith(stopped.text)
