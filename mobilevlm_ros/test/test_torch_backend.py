"""The torch language backend's variants: static KV cache (the CUDA-graph path) and int8 weight-only."""

import numpy as np
import pytest
import torch

from mobilevlm_ros.runtime.language import Int8Linear, TorchLanguageModel, TorchStaticKVCache
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import Session
from mobilevlm_ros.runtime.vlm import MobileVLM

IMAGE = np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8)
PARAMS = SamplingParams(max_new_tokens=10, min_new_tokens=10)


@pytest.fixture
def vlm(make_checkpoint) -> MobileVLM:
    return MobileVLM.from_pretrained(make_checkpoint(dtype=torch.float32), device="cpu")


def answer_ids(vlm: MobileVLM, language) -> list[list[int]]:
    """Greedy ids of two questions on one session (the second reuses the truncated prefix) and a choice."""
    session = Session(language, vlm.tokenizer, vlm.encode_image(IMAGE)[0])
    first = list(session.generate("What is in the image?", PARAMS))
    second = list(session.generate("What colour is it?", PARAMS))
    return [first, second, [sorted(session.choose("Go.", ["left", "right", "stop"]).scores.items())]]


def test_static_cache_generates_what_the_dynamic_cache_does(vlm):
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    assert isinstance(static.new_cache(), TorchStaticKVCache)
    dynamic_ids = answer_ids(vlm, TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=False))
    static_ids = answer_ids(vlm, static)
    assert static_ids[:2] == dynamic_ids[:2]
    for (option, score), (_, expected) in zip(static_ids[2][0], dynamic_ids[2][0]):
        assert score == pytest.approx(expected, abs=1e-4), option


def test_int8_weights_keep_the_logits(vlm):
    cache = TorchLanguageModel(vlm.language.model, vlm.config.context_length).new_cache()
    ids = [vlm.tokenizer.bos_id] + vlm.tokenizer.encode("A chat between a curious user and an assistant.")
    reference = cache.append_tokens(ids, all_logits=True)
    int8 = TorchLanguageModel(vlm.language.model, vlm.config.context_length, int8=True)
    llm = vlm.language.model
    assert all(isinstance(layer, Int8Linear) for layer in (llm.lm_head, llm.base_model.layers[0].mlp.down_proj))
    assert llm.base_model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    quantized = int8.new_cache().append_tokens(ids, all_logits=True)
    cosine = torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0).item()
    assert cosine >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none visible to torch)")
def test_cuda_graph_decode_matches_eager(make_checkpoint):
    vlm = MobileVLM.from_pretrained(make_checkpoint(dtype=torch.float32), device="cuda", dtype=torch.float32)
    eager = answer_ids(vlm, TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=False))
    graphed = answer_ids(vlm, TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True))
    assert graphed[:2] == eager[:2]
