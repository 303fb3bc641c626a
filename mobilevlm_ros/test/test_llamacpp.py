"""The llama.cpp backend against the torch one on a tiny checkpoint: same greedy tokens (F32/F16), close logits (Q8_0),
sessions (reuse, streaming, history, choose) unchanged, and its own sequence, truncation and memory handling."""

import dataclasses
import gc
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest
import torch

from mobilevlm_ros import ggml
from mobilevlm_ros.cli import main
from mobilevlm_ros.errors import ArtifactError, BackendError, PromptError
from mobilevlm_ros.export.gguf import llm_gguf_artifact
from mobilevlm_ros.ggml import extra_buffer_types
from mobilevlm_ros.model.checkpoint import load_checkpoint
from mobilevlm_ros.runtime.llamacpp import LlamaCppLanguageModel
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import Answer
from mobilevlm_ros.runtime.vision import TorchVision
from mobilevlm_ros.runtime.vlm import MobileVLM

QUESTIONS = ["What is in the image?", "How many shapes are there?"]


def assert_same_answer(*answers: Answer) -> None:
    """Same text and token counts; the mean log-probability only up to float rounding (a reused KV cache or another
    backend sums in another order)."""
    first = answers[0]
    for answer in answers[1:]:
        assert dataclasses.replace(answer, mean_logprob=0.0) == dataclasses.replace(first, mean_logprob=0.0)
        assert answer.mean_logprob == pytest.approx(first.mean_logprob, abs=1e-2)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def torch_vlm(checkpoint) -> MobileVLM:
    return MobileVLM.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def llama_vlms(checkpoint, engines) -> dict[str, MobileVLM]:
    return {quant: MobileVLM.from_pretrained(checkpoint, device="cpu", language="llamacpp", quant=quant, engines_dir=engines)
            for quant in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (200, 160, 3), dtype=np.uint8)


def first_turn_logits(vlm: MobileVLM, image: np.ndarray, question: str) -> torch.Tensor:
    """Logits of every question position and the first answer token: [question tokens, vocab]."""
    session = vlm.session(image)
    ids = vlm.tokenizer.encode(f"\n{question} ASSISTANT:")
    return session.cache.append_tokens(ids, all_logits=True)


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_greedy_tokens_match_torch(torch_vlm, llama_vlms, image, quant):
    params = SamplingParams(max_new_tokens=16)
    ours, reference = llama_vlms[quant].session(image), torch_vlm.session(image)
    for question in QUESTIONS:
        assert list(ours.generate(question, params)) == list(reference.generate(question, params))


def test_f32_logits_match_torch(torch_vlm, llama_vlms, image):
    torch.testing.assert_close(first_turn_logits(llama_vlms["f32"], image, QUESTIONS[0]),
                               first_turn_logits(torch_vlm, image, QUESTIONS[0]), atol=2e-3, rtol=1e-3)


def test_q8_0_logits_are_close(torch_vlm, llama_vlms, image):
    for question in QUESTIONS:
        ours, reference = first_turn_logits(llama_vlms["q8_0"], image, question), first_turn_logits(torch_vlm, image, question)
        assert torch.nn.functional.cosine_similarity(ours, reference, dim=-1).min() >= 0.99


def test_sessions_work_unchanged(torch_vlm, llama_vlms, image):
    vlm = llama_vlms["f32"]
    params = SamplingParams(max_new_tokens=10)
    session = vlm.session(image)
    first, second = session.ask(QUESTIONS[0], params), session.ask(QUESTIONS[1], params)
    assert_same_answer(second, vlm.session(image).ask(QUESTIONS[1], params))
    assert_same_answer(first, vlm.session(image).ask(QUESTIONS[0], params), torch_vlm.session(image).ask(QUESTIONS[0], params))
    assert "".join(session.stream(QUESTIONS[0], params)) == first.text
    history = vlm.session(image, keep_history=True)
    reference = torch_vlm.session(image, keep_history=True)
    for question in QUESTIONS:
        assert_same_answer(history.ask(question, SamplingParams(max_new_tokens=4)),
                           reference.ask(question, SamplingParams(max_new_tokens=4)))


def test_choose_ranks_like_torch(torch_vlm, llama_vlms, image):
    options = ["move_forward", "turn_left", "turn_right", "stop"]
    for instruction in ("Go to the red square.", "Turn around."):
        ours = llama_vlms["f32"].session(image).choose(instruction, options)
        reference = torch_vlm.session(image).choose(instruction, options)
        assert ours.option == reference.option
        assert sorted(options, key=ours.scores.get) == sorted(options, key=reference.scores.get)
        for option in options:
            assert ours.scores[option] == pytest.approx(reference.scores[option], abs=1e-2)
        assert sum(np.exp(s - max(ours.scores.values())) for s in ours.scores.values()) == pytest.approx(1 / ours.confidence)


def test_min_new_tokens_suppresses_eos(llama_vlms, image):
    session = llama_vlms["q8_0"].session(image)
    tokens = list(session.generate(QUESTIONS[0], SamplingParams(max_new_tokens=12)))
    eos, tokenizer = tokens[2], llama_vlms["q8_0"].tokenizer
    tokenizer.eos_id, original = eos, tokenizer.eos_id
    try:
        assert len(list(session.generate(QUESTIONS[0], SamplingParams(max_new_tokens=12)))) == 2
        forced = list(session.generate(QUESTIONS[0], SamplingParams(max_new_tokens=12, min_new_tokens=12)))
    finally:
        tokenizer.eos_id = original
    assert len(forced) == 12 and eos not in forced[:12]


def test_only_the_vision_part_is_in_torch(llama_vlms, checkpoint):
    """llama.cpp runs the LLM: torch loads the vision path only (the LLM's parameters stay on the meta device)."""
    model = load_checkpoint(checkpoint, with_language_model=False).model
    assert model.lm_head.weight.is_meta and model.get_input_embeddings().weight.is_meta
    assert model.base_model.layers[0].mlp.up_proj.weight.is_meta
    vlm = llama_vlms["q8_0"]
    assert isinstance(vlm.vision, TorchVision) and not any(p.is_meta for p in vlm.vision.vision_path.parameters())


@pytest.fixture
def backend(engines, checkpoint) -> LlamaCppLanguageModel:
    artifact = llm_gguf_artifact(checkpoint, "f32", engines, build=False)
    return LlamaCppLanguageModel(artifact.path, max_sequences=2, kv_cells=256, batch_size=16)


def test_sequences_are_handed_out_and_returned(backend):
    first, second = backend.new_cache(), backend.new_cache()
    assert {first.sequence, second.sequence} == {0, 1}
    with pytest.raises(BackendError, match="all 2 llama.cpp sequences are in use"):
        backend.new_cache()
    second.append_tokens([1, 5, 6])
    del second
    gc.collect()
    third = backend.new_cache()
    assert third.length == 0
    logits = third.append_tokens([1, 5, 6])
    first.close()
    with pytest.raises(BackendError, match="closed"):
        first.append_tokens([1])
    fresh = backend.new_cache()
    torch.testing.assert_close(fresh.append_tokens([1, 5, 6]), logits)  # a reused sequence starts empty


def test_truncate_and_batches(backend):
    """Appends longer than a batch (16 here) are split; truncating and re-appending gives the same logits as fresh."""
    ids = list(range(3, 43))
    cache = backend.new_cache()
    all_logits = cache.append_tokens(ids, all_logits=True)
    assert all_logits.shape == (40, backend.vocab_size) and cache.length == 40
    cache.truncate(25)
    torch.testing.assert_close(cache.append_tokens(ids[25:]), all_logits[-1])
    other = backend.new_cache()
    torch.testing.assert_close(other.append_tokens(ids[:20], all_logits=True), all_logits[:20])
    assert other.append_embeds(torch.zeros(30, backend.hidden_size)).shape == (backend.vocab_size,)
    with pytest.raises(ValueError, match="cannot truncate a 40-token cache to 41"):
        cache.truncate(41)
    with pytest.raises(ValueError, match=r"embeddings must be \[tokens, 64\]"):
        cache.append_embeds(torch.zeros(3, 65))


def test_full_kv_cells_fail_cleanly(backend):
    """256 cells are shared: when another cache holds most of them, an append fails and leaves the cache as it was."""
    big, small = backend.new_cache(), backend.new_cache()
    big.append_tokens([5] * 200)
    small.append_tokens([5] * 20)
    with pytest.raises(BackendError, match=r"KV cache \(256 cells, shared by all open sessions\) is full"):
        small.append_tokens([5] * 50)
    assert small.length == 20
    big.truncate(100)
    small.append_tokens([5] * 50)
    with pytest.raises(PromptError, match="the context holds 256"):
        small.append_tokens([5] * 200)


def test_prompt_longer_than_the_context(llama_vlms, image):
    session = llama_vlms["q8_0"].session(image)
    with pytest.raises(PromptError, match=r"prompt is \d+ tokens with the image; the context holds 1024"):
        session.ask("why " * 2000)
    assert session.ask("Still fine?", SamplingParams(max_new_tokens=2)).generated_tokens <= 2


def test_llama_cpp_writes_nothing_to_stdout_or_stderr(backend):
    """Its chatter goes to Python logging (at DEBUG), so a process that configured no logging prints nothing."""
    code = (
        "import sys; from mobilevlm_ros.runtime.llamacpp import LlamaCppLanguageModel; "
        "LlamaCppLanguageModel(sys.argv[1]).new_cache().append_tokens([1, 2, 3])"
    )
    quiet = subprocess.run([sys.executable, "-c", code, str(backend.path)], capture_output=True, text=True, timeout=120)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    verbose = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.DEBUG); " + code, str(backend.path)],
                             capture_output=True, text=True, timeout=120)
    assert "DEBUG:mobilevlm_ros.ggml.native:llama_model_loader: loaded meta data" in verbose.stderr


def test_building_disabled(checkpoint, tmp_path, engines):
    with pytest.raises(ArtifactError, match="not built yet, and building is disabled"):
        MobileVLM.from_pretrained(checkpoint, device="cpu", language="llamacpp", quant="q8_0", engines_dir=tmp_path, build=False)
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu", language="llamacpp", quant="q8_0", engines_dir=engines, build=False)
    assert vlm.language.name == "llamacpp"


def test_ask_command_on_llamacpp(checkpoint, engines, tmp_path, camera_image, llama_vlms, capsys):
    from PIL import Image

    Image.fromarray(camera_image).save(tmp_path / "frame.png")
    args = ["ask", "--model", str(checkpoint), "--image", str(tmp_path / "frame.png"), "--max-new-tokens", "6",
            "--language", "llamacpp", "--quant", "q8_0", "--engines-dir", str(engines), "What is here?"]
    assert main(args) == 0
    assert capsys.readouterr().out == llama_vlms["q8_0"].ask(camera_image, "What is here?", max_new_tokens=6) + "\n"


@pytest.fixture(scope="module")
def repackable_gguf(make_checkpoint, engines):
    """Q4_K_S of an LLM 256 wide: rows llama.cpp's k-quants and its CPU repacking (x86 AVX2 and up) both take."""
    return llm_gguf_artifact(make_checkpoint(dtype=torch.float32, hidden_size=256), "q4_k_s", engines).path


def test_the_default_keeps_cpu_repacking_and_leaves_amx_out(repackable_gguf):
    model = LlamaCppLanguageModel(repackable_gguf, kv_cells=64)
    assert "CPU_REPACK" in extra_buffer_types().names  # llama.cpp built for x86 with AVX2 or better
    assert "CPU_REPACK" in model.model_buffers and "AMX" not in model.model_buffers


def test_a_left_out_buffer_type_holds_no_weights(repackable_gguf, monkeypatch):
    """The mechanism that keeps AMX out, shown on the buffer type every x86 build has: with CPU_REPACK standing in
    for AMX, `amx=False` loads every weight into plain CPU buffers, and the model computes the same."""
    repacked = LlamaCppLanguageModel(repackable_gguf, kv_cells=64)
    monkeypatch.setattr(ggml, "AMX_BUFFER_TYPE", "CPU_REPACK")
    plain = LlamaCppLanguageModel(repackable_gguf, kv_cells=64, amx=False)
    assert "CPU_REPACK" not in plain.model_buffers and set(plain.model_buffers) <= {"CPU", "CPU_Mapped"}
    ids = [1, 15, 27, 33, 8]
    logits = plain.new_cache().append_tokens(ids), repacked.new_cache().append_tokens(ids)
    assert torch.nn.functional.cosine_similarity(*logits, dim=0) >= 0.999
    monkeypatch.undo()
    assert "CPU_REPACK" in LlamaCppLanguageModel(repackable_gguf, kv_cells=64).model_buffers  # offered again


@pytest.fixture(scope="module")
def f32_gguf(engines, checkpoint):
    return llm_gguf_artifact(checkpoint, "f32", engines).path


def test_flash_attention_is_automatic_where_layers_are_offloaded_and_off_on_the_cpu(f32_gguf):
    from mobilevlm_ros.runtime.llamacpp import FLASH_ATTENTION_TYPES, flash_attention_setting

    assert [flash_attention_setting(None, offloaded) for offloaded in (True, False)] == ["auto", "off"]
    assert ([flash_attention_setting(forced, offloaded) for forced in (True, False) for offloaded in (True, False)]
            == ["on", "on", "off", "off"])
    assert FLASH_ATTENTION_TYPES["auto"] == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    if not llama_cpp.llama_supports_gpu_offload():  # this build: the CPU path is what it was
        backend = LlamaCppLanguageModel(f32_gguf, max_sequences=1, kv_cells=64)
        assert backend.flash_attention == "off" and ggml.gpu_devices() == []
        backend.close()


def test_a_cpu_only_build_beside_a_cuda_gpu_is_a_warning(f32_gguf, monkeypatch, caplog):
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp has a GPU backend")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("WARNING", logger="mobilevlm_ros.runtime.llamacpp"):
        LlamaCppLanguageModel(f32_gguf, max_sequences=1, kv_cells=64).close()
        LlamaCppLanguageModel(f32_gguf, max_sequences=1, kv_cells=64, gpu_layers=0).close()  # asked for the CPU
    warnings = [r.getMessage() for r in caplog.records if "CPU-only build" in r.getMessage()]
    assert len(warnings) == 1 and "README: llama.cpp on a Jetson" in warnings[0]


@pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="llama.cpp here has no GPU backend (a CPU-only build)")
def test_layers_go_to_the_gpu_with_flash_attention_automatic(f32_gguf):
    backend = LlamaCppLanguageModel(f32_gguf, max_sequences=1, kv_cells=64)
    assert ggml.gpu_devices() and backend.flash_attention == "auto"
    assert any(name != "CPU" and not name.startswith("CPU_") for name in backend.model_buffers), backend.model_buffers
