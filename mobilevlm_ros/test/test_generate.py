"""Generation: cached decoding equals recomputing the whole sequence; EOS, token and context limits; sampling."""

import numpy as np
import pytest
import torch

from mobilevlm_ros.errors import PromptError
from mobilevlm_ros.runtime.generate import generate_tokens
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.vlm import MobileVLM

NO_EOS = -1


@pytest.fixture(scope="module")
def vlm(make_checkpoint) -> MobileVLM:
    return MobileVLM.from_pretrained(make_checkpoint(dtype=torch.float32), device="cpu")


@pytest.fixture(scope="module")
def prompt(vlm) -> torch.Tensor:
    image = np.random.default_rng(3).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    return vlm.prompt_embeds(vlm.prompt_ids("What is in the image?"), vlm.encode_image(image))


def greedy_without_cache(vlm: MobileVLM, prompt: torch.Tensor, steps: int) -> list[int]:
    """Reference: run the whole sequence again for every token and take the argmax."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            embeds = torch.cat([prompt, vlm.model.model.embed_tokens(torch.tensor([tokens], dtype=torch.long))], dim=1)
            tokens.append(int(vlm.model(inputs_embeds=embeds).logits[0, -1].argmax()))
    return tokens


def test_cached_greedy_equals_recomputing_everything(vlm, prompt):
    ours = list(generate_tokens(vlm.model, prompt, NO_EOS, SamplingParams(max_new_tokens=12), 1024))
    assert ours == greedy_without_cache(vlm, prompt, 12)


def test_stops_at_eos_without_yielding_it(vlm, prompt):
    greedy = list(generate_tokens(vlm.model, prompt, NO_EOS, SamplingParams(max_new_tokens=12), 1024))
    eos = greedy[4]
    stopped = list(generate_tokens(vlm.model, prompt, eos, SamplingParams(max_new_tokens=12), 1024))
    assert stopped == greedy[: greedy.index(eos)]


def test_context_limit_stops_generation(vlm, prompt):
    length = prompt.shape[1]
    tokens = list(generate_tokens(vlm.model, prompt, NO_EOS, SamplingParams(max_new_tokens=50), length + 2))
    assert len(tokens) == 3  # two fit in the context; the third is sampled from the last position and never fed


def test_sampling_is_repeatable_with_a_seed(vlm, prompt):
    def sample(seed):
        return list(generate_tokens(vlm.model, prompt, NO_EOS, SamplingParams(max_new_tokens=10, temperature=1.5, seed=seed), 1024))

    assert sample(1) == sample(1)
    assert len({tuple(sample(seed)) for seed in range(5)}) > 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be positive, got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens must be positive, got -3"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
])
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(PromptError, match=message):
        SamplingParams(**kwargs)


def test_ask_returns_the_decoded_greedy_answer(vlm, camera_image):
    answer = vlm.ask(camera_image, "What is in the image?", max_new_tokens=8)
    embeds = vlm.prompt_embeds(vlm.prompt_ids("What is in the image?"), vlm.encode_image(camera_image))
    expected = greedy_without_cache(vlm, embeds, 8)
    if vlm.tokenizer.eos_id in expected:
        expected = expected[: expected.index(vlm.tokenizer.eos_id)]
    assert answer == vlm.tokenizer.decode(expected).strip()


def test_bgr_frames_give_the_rgb_answer(vlm, camera_image):
    rgb = vlm.ask(camera_image, "What colour?", max_new_tokens=6)
    assert vlm.ask(camera_image[:, :, ::-1].copy(), "What colour?", max_new_tokens=6, channel_order="bgr") == rgb


def test_prompt_longer_than_the_context_names_the_limit(vlm, camera_image):
    with pytest.raises(PromptError, match=r"prompt is \d+ tokens with the image; the context holds 1024"):
        vlm.ask(camera_image, "why " * 2000)


def test_empty_question_fails_before_any_work(vlm):
    with pytest.raises(PromptError, match="question is empty"):
        vlm.ask("not even an image", " ")
