"""Sampling: greedy, temperature with a seed, top-k, top-p, repetition penalty, parameter validation."""

import pytest
import torch

from mobilevlm_ros.errors import PromptError
from mobilevlm_ros.runtime.sampling import Sampler, SamplingParams, nucleus, penalize_repetition

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])


def draws(params: SamplingParams, count: int = 200) -> set[int]:
    sampler = Sampler(params)
    return {sampler(LOGITS, []) for _ in range(count)}


def test_greedy_takes_the_argmax():
    assert draws(SamplingParams()) == {4}


def test_seed_repeats_the_draws():
    def sequence(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(LOGITS, []) for _ in range(30)]

    assert sequence(5) == sequence(5)
    assert len(set(sequence(5))) > 1


def test_top_k_keeps_the_k_best():
    assert draws(SamplingParams(temperature=2.0, top_k=2, seed=0)) == {0, 4}
    assert draws(SamplingParams(temperature=2.0, top_k=1, seed=0)) == {4}


def test_top_p_keeps_the_nucleus():
    probs = torch.softmax(LOGITS, -1)  # sorted: 4 (0.61), 0 (0.22), 1 (0.08), 2 (0.05), 3 (0.01)
    assert probs[4] < 0.7 < probs[4] + probs[0]
    assert torch.isfinite(nucleus(LOGITS, 0.7)).nonzero().flatten().tolist() == [0, 4]
    assert torch.isfinite(nucleus(LOGITS, 0.5)).nonzero().flatten().tolist() == [4]
    assert draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0)) == {0, 4}


def test_repetition_penalty_lowers_seen_tokens():
    penalized = penalize_repetition(LOGITS, [4, 3, 4], 2.0)
    assert penalized.tolist() == [2.0, 1.0, 0.5, -2.0, 1.5]
    assert Sampler(SamplingParams(repetition_penalty=2.0))(LOGITS, [4]) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be positive, got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens must be positive, got -3"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(stop=("",)), "stop strings must not be empty"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(PromptError, match=message):
        SamplingParams(**kwargs)
