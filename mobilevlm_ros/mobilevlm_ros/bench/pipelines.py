"""What each benchmark pipeline loads and times, one `setup_*` per pipeline, run in its worker process (harness.py).

A setup loads its pipeline and returns its run (new tokens -> the run's figures) and what it reports about itself.
Ours goes through the library's public calls only; the baselines are what it is compared with.
"""

import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mobilevlm_ros.bench import BenchOptions
from mobilevlm_ros.bench.harness import Run
from mobilevlm_ros.bench.workload import FIRST_QUESTION, SECOND_QUESTION, TILES_FRAME, answer_metrics, bench_frame
from mobilevlm_ros.cpu import physical_cores
from mobilevlm_ros.model.checkpoint import load_checkpoint
from mobilevlm_ros.model.prompt import load_tokenizer, prefix_ids, question_ids
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.vision import TorchVision
from mobilevlm_ros.runtime.vlm import FrameViews, MobileVLM


def setup_ours(model_dir: str, options: BenchOptions, engines_dir: str | None) -> tuple[Run, dict[str, Any]]:
    """Our pipeline, `MobileVLM.session` with its two vision steps timed apart: the frame's views, their pixels
    (`image_processor.batch`) and embeddings (`vision`), then `open_session` on them. The first question pays for
    vision and the prefix, the second reuses them."""
    started = time.perf_counter()
    vlm = MobileVLM.from_pretrained(
        model_dir, device=options.device, dtype=getattr(torch, options.vision_dtype), language=options.language,
        quant=options.quant, engines_dir=engines_dir, vision=options.vision, vision_precision=options.vision_precision,
        llama_amx=options.llama_amx,
    )
    load_s = time.perf_counter() - started
    image = bench_frame()
    tile_views = vlm.views(bench_frame(TILES_FRAME), "tiles", max_tiles=options.tiles) if options.tiles else None

    def encode(views: FrameViews) -> tuple[torch.Tensor, float, float]:
        """`encode_images(views.images)`, step by step: the embeddings, and when preprocessing and vision ended."""
        pixels = vlm.image_processor.batch(views.images)
        preprocessed = _sync(time.perf_counter())
        embeds = vlm.vision(pixels)
        return embeds, preprocessed, _sync(time.perf_counter())

    def run(new_tokens: int) -> dict[str, float]:
        params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        t0 = time.perf_counter()
        views = vlm.views(image)
        embeds, t1, t2 = encode(views)
        session = vlm.open_session(views, embeds)
        first = _token_times(session.generate(FIRST_QUESTION, params))
        prompt_tokens = session.prompt_tokens
        t3 = time.perf_counter()
        second = _token_times(session.generate(SECOND_QUESTION, params))
        timings = answer_metrics(t0, t1, t2, first, t3, second, prompt_tokens)
        return timings | (tiles_metrics() if tile_views else {})

    def tiles_metrics() -> dict[str, float]:
        """`tiles` mode: overview + tiles of the high-resolution frame as one vision batch, then one question's first
        token after prefilling them all (after the timed answer, so it cannot slow it)."""
        t0 = time.perf_counter()
        embeds, t1, t2 = encode(tile_views)
        session = vlm.open_session(tile_views, embeds)
        list(session.generate(FIRST_QUESTION, SamplingParams(max_new_tokens=1, min_new_tokens=1)))
        return {"tiles": len(tile_views.images) - 1, "tiles_vision_ms": (t2 - t1) * 1e3,
                "tiles_prompt_tokens": session.prompt_tokens, "tiles_ttft_s": time.perf_counter() - t0}

    threads = getattr(vlm.vision, "threads", torch.get_num_threads())
    info = {"pipeline": f"{options.language} backend", "load_s": load_s, "vision_threads": threads}
    if options.language == "llamacpp":
        info["llama_cpp_buffers"] = vlm.language.model_buffers
    return run, info


def setup_torch_vision(model_dir: str, options: BenchOptions) -> tuple[Run, dict[str, Any]]:
    """Our pipeline's vision step (tower + projector on the same frame) in torch eager, for the vision backends to beat.
    A process of its own keeps the torch tower out of our pipeline's memory, as in deployment."""
    dtype = getattr(torch, options.vision_dtype)
    started = time.perf_counter()
    checkpoint = load_checkpoint(model_dir, dtype=dtype, device=options.device, with_language_model=False)
    load_s = time.perf_counter() - started
    vision = TorchVision(checkpoint.model.vision_path)
    pixels = checkpoint.image_processor.batch([bench_frame()]).to(vision.device, dtype)

    def run(new_tokens: int) -> dict[str, float]:
        started = _sync(time.perf_counter())
        vision(pixels)
        return {"vision_ms": (_sync(time.perf_counter()) - started) * 1e3}

    return run, {"pipeline": f"torch eager tower + projector, {options.vision_dtype}", "load_s": load_s,
                 "vision_threads": torch.get_num_threads()}


class StepTimes(LogitsProcessor):
    """Called by `generate` once per generated token, right after its forward pass: the tokens' clock readings."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(_sync(time.perf_counter()))
        return scores


def setup_reference(model_dir: str, options: BenchOptions) -> tuple[Run, dict[str, Any]]:
    """The plain transformers path: no sessions; the second question re-prefills the whole prompt (the frame's
    features are reused, so it is spared the vision pass)."""
    started = time.perf_counter()
    vlm = MobileVLM.from_pretrained(model_dir, device=options.device)
    load_s = time.perf_counter() - started
    model = vlm.language.model  # the torch LLM, for its generate()
    image = bench_frame()
    eos = vlm.tokenizer.eos_id

    def generate(question: str, image_embeds: torch.Tensor, new_tokens: int) -> tuple[list[float], int]:
        inputs = model.embed_with_images(vlm.prompt_ids(question), image_embeds)
        timer = StepTimes()
        model.generate(
            inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
            logits_processor=LogitsProcessorList([timer]),
        )
        return timer.times, inputs.shape[1]

    def run(new_tokens: int) -> dict[str, float]:
        t0 = time.perf_counter()
        pixels = vlm.image_processor.batch([image])
        t1 = _sync(time.perf_counter())
        embeds = vlm.vision(pixels)
        t2 = _sync(time.perf_counter())
        first, prompt_tokens = generate(FIRST_QUESTION, embeds, new_tokens)
        t3 = time.perf_counter()
        second, _ = generate(SECOND_QUESTION, embeds, new_tokens)
        return answer_metrics(t0, t1, t2, first, t3, second, prompt_tokens)

    return run, {"pipeline": f"transformers generate(inputs_embeds), {model.dtype}", "load_s": load_s}


def setup_llamacpp_plain(model_dir: str, gguf_path: str, prompt_tokens: int, amx: bool | None) -> tuple[Run, dict[str, Any]]:
    """llama-cpp-python's high-level generation on the same GGUF, with a text prompt as long as ours, and the same
    llama.cpp CPU buffer types (AMX on or off) as ours, so the ratio compares the drivers, not the kernels."""
    from llama_cpp import Llama

    from mobilevlm_ros.ggml import model_load

    tokenizer = load_tokenizer(model_dir)
    text = prefix_ids(tokenizer)
    question = question_ids(tokenizer, FIRST_QUESTION)
    filler = (tokenizer.encode(" a photo of a room with a table and a chair") * prompt_tokens)[: prompt_tokens - len(text) - len(question)]
    prompt = text + filler + question  # where our prompt has the image embeddings, this has as many text tokens
    threads = physical_cores()  # as our backend
    started = time.perf_counter()
    with model_load(amx) as buffers:
        llm = Llama(model_path=gguf_path, n_ctx=0, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - started

    def run(new_tokens: int) -> dict[str, float]:
        llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt
        t0 = time.perf_counter()
        times = []
        for _token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
            times.append(time.perf_counter())
            if len(times) == new_tokens:
                break
        return {
            "prefill_tok_s": len(prompt) / (times[0] - t0),
            "ttft_s": times[0] - t0,
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
            "answer_s": times[-1] - t0,
            "prompt_tokens": len(prompt),
            "generated_tokens": len(times),
        }

    return run, {"pipeline": "llama_cpp.Llama.generate, text-only prompt", "load_s": load_s, "llama_cpp_buffers": buffers}


def _token_times(tokens: Iterator[int]) -> list[float]:
    return [time.perf_counter() for _ in tokens]


def _sync(now: float) -> float:
    """A timestamp after the GPU's queued work is done (the same timestamp on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        return time.perf_counter()
    return now
