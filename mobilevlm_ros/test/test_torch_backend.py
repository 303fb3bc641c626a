"""The torch language backend's variants: static KV cache (the CUDA-graph path) and int8 weight-only."""

import logging

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mobilevlm_ros.runtime import language as language_module
from mobilevlm_ros.runtime.language import Int8Linear, TorchKVCache, TorchLanguageModel, TorchStaticKVCache
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
    for (option, score), (_, expected) in zip(static_ids[2][0], dynamic_ids[2][0], strict=True):
        assert score == pytest.approx(expected, abs=1e-4), option


OTHER_IMAGE = np.random.default_rng(6).integers(0, 256, (80, 60, 3), dtype=np.uint8)


def interleaved(vlm: MobileVLM, language) -> list:
    """What two sessions (one keeping history) answer and choose when their turns alternate on one backend."""
    first = Session(language, vlm.tokenizer, vlm.encode_image(IMAGE)[0])
    second = Session(language, vlm.tokenizer, vlm.encode_image(OTHER_IMAGE)[0], keep_history=True)
    results = []
    for session, question in [(first, "What is in the image?"), (second, "How many shapes?"), (first, "What colour is it?"),
                              (second, "And their colour?"), (first, "Where is it?")]:
        results.append(list(session.generate(question, PARAMS)))
    for session in (second, first, second):
        results.append(sorted(session.choose("Go.", ["left", "right", "stop"]).scores.items()))
    results.append(list(second.generate("Anything else?", PARAMS)))
    # A truncate inside a segment (half of the last question), then the other session, then an append after it.
    second.cache.truncate(second.cache.length - 3)
    results.append(list(first.generate("Is it big?", PARAMS)))
    results.append(second.cache.append_tokens([5, 6]).argmax().item())
    return results


def assert_same_results(ours: list, expected: list) -> None:
    for got, want in zip(ours, expected, strict=True):
        if got and isinstance(got, list) and isinstance(got[0], tuple):  # choice scores
            for (option, score), (_, reference) in zip(got, want, strict=True):
                assert score == pytest.approx(reference, abs=1e-4), option
        else:
            assert got == want


def test_alternating_sessions_share_one_static_buffer_and_answer_like_dynamic_caches(vlm, monkeypatch):
    made = []

    class CountedStaticCache(language_module.StaticCache):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(language_module, "StaticCache", CountedStaticCache)
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    dynamic = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=False)
    assert_same_results(interleaved(vlm, static), interleaved(vlm, dynamic))
    for _ in range(5):  # the node's pattern: a session per frame, an answer and a choice each
        session = Session(static, vlm.tokenizer, vlm.encode_image(IMAGE)[0])
        session.ask("What is in the image?", PARAMS)
        session.choose("Go.", ["left", "right"])
    assert len(made) == 1
    keys = static.shared_static_cache().cache.layers[0].keys
    assert keys.shape[-2] == vlm.config.context_length  # one buffer of the context length, whatever the sessions


def test_a_session_that_finds_its_prefix_in_the_buffer_replays_only_the_rest(vlm, monkeypatch):
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    prefix, image = [vlm.tokenizer.bos_id, 5, 6, 7], vlm.encode_image(IMAGE)[0]
    first, second = static.new_cache(), static.new_cache()
    first.append_tokens(prefix)
    first.append_embeds(image)
    second.append_tokens(prefix)
    second.append_tokens([8, 9])
    starts = []
    real_forward = language_module._forward

    def recording(model, cache, start, inputs_embeds, all_logits):
        starts.append((start, inputs_embeds.shape[1]))
        return real_forward(model, cache, start, inputs_embeds, all_logits)

    monkeypatch.setattr(language_module, "_forward", recording)
    first.append_tokens([10])  # the buffer holds `second`: the shared prefix stays, the image is replayed
    assert starts == [(4, image.shape[0]), (4 + image.shape[0], 1)]
    assert static.shared_static_cache().content is first.log
    starts.clear()
    first.truncate(4)
    second.append_tokens([11])  # truncated to the shared prefix: only [8, 9] is replayed
    assert starts == [(4, 2), (6, 1)]


def test_new_sessions_never_allocate_a_buffer_and_dynamic_stays_per_session(vlm):
    dynamic = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=False)
    assert isinstance(dynamic.new_cache(), TorchKVCache) and dynamic._shared is None
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    caches = [static.new_cache() for _ in range(3)]
    assert {id(cache.shared) for cache in caches} == {id(static.shared_static_cache())}
    assert not static.shared_static_cache().cache.layers[0].is_initialized  # allocated at the first prefill only


def test_a_static_cache_without_cumulative_length_falls_back_to_dynamic_caches(vlm, monkeypatch, caplog):
    class OldStaticCache(language_module.StaticCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for layer in self.layers:
                del layer.cumulative_length

    monkeypatch.setattr(language_module, "StaticCache", OldStaticCache)
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    with caplog.at_level(logging.WARNING, logger="mobilevlm_ros.runtime.language"):
        caches = [static.new_cache() for _ in range(3)]
    assert all(type(cache) is TorchKVCache for cache in caches) and not static.static_cache
    assert len([r for r in caplog.records if "no cumulative_length" in r.getMessage()]) == 1
    dynamic = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=False)
    assert answer_ids(vlm, static)[:2] == answer_ids(vlm, dynamic)[:2]


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value back to the host (`.item()`, `bool(t)`, `int(t)`): on CUDA each is
    a synchronisation, which CUDA graph capture refuses (or would bake into the graph as a constant)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_decode_step_reads_nothing_back_to_the_host(vlm):
    """What the CUDA graph captures, run on the CPU: no op in it may need a tensor's value on the host."""
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    static.new_cache().append_tokens([vlm.tokenizer.bos_id, 5, 6, 7])
    shared = static.shared_static_cache()
    shared._token = torch.tensor([[8]])
    shared._position = torch.tensor([shared.position])
    with torch.inference_mode(), HostReads() as recorder:
        logits = shared._decode_step()
    assert logits.shape[:2] == (1, 1) and recorder.reads == []
    with HostReads() as control:  # the recorder sees such reads
        bool(torch.ones(2).sum() > 0)
    assert control.reads


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
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    graphed = answer_ids(vlm, static)
    assert graphed[:2] == eager[:2]
    assert static.shared_static_cache()._graph is not None  # the decode steps ran as the captured graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none visible to torch)")
def test_cuda_graph_is_captured_once_for_alternating_sessions(make_checkpoint):
    vlm = MobileVLM.from_pretrained(make_checkpoint(dtype=torch.float32), device="cuda", dtype=torch.float32)
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    dynamic = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=False)
    first = interleaved(vlm, static)
    graph = static.shared_static_cache()._graph
    assert graph is not None
    assert_same_results(first, interleaved(vlm, dynamic))
    interleaved(vlm, static)
    assert static.shared_static_cache()._graph is graph
