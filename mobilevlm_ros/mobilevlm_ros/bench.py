"""`mobilevlm bench`: the whole pipeline (camera frame -> answer) of a MobileVLM of real dimensions, against baselines.

With `--size 1.7b` or `3b` the bench writes a checkpoint of that architecture with random weights (no download) in the
official on-disk format, so the same loader, GGUF export and sessions run as for a real model; `--model DIR` takes a
real checkpoint instead. Random weights make the answers meaningless but the work identical, and every answer is forced
to `new_tokens` tokens (EOS suppressed) so the pipelines compare equal work.

Each pipeline is loaded in a process of its own, so its peak RSS is its own (the checkpoint writer and the GGUF build,
which hold the fp16 weights in memory, run in processes of their own too). After a warm-up run each, the pipelines
whose speeds are compared run in turn, run by run (ours, llamacpp-plain and torch eager vision alternate), so a shared
machine whose speed drifts affects them alike; the slow reference runs on its own afterwards. Medians are reported.
- ours: `MobileVLM` sessions on the chosen language backend: a frame is encoded and [system + image] prefilled once,
  then each question prefills only itself; the second question reuses the frame.
- reference (`--vs reference`): the plain transformers path, torch vision and projector then
  `LlamaForCausalLM.generate(inputs_embeds=..., do_sample=False, min_new_tokens=max_new_tokens=N)` on the whole prompt.
- llamacpp-plain (`--vs llamacpp-plain`): llama-cpp-python's own `Llama.generate` on the same GGUF file, greedy, with a
  text-only prompt of the same token count (no image path exists there); it shows what our ctypes driving costs.
- torch eager vision (with `--vision onnxruntime|tensorrt`): our vision step, tower + projector on the same frame, in
  torch with `--vision-dtype` and as many threads as our backend, for the "vision speed-up vs torch eager" ratio.
"""

import json
import logging
import platform
import random
import resource
import shutil
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from mobilevlm_ros.choices import vision_precision
from mobilevlm_ros.model.vision import CLIP_VIT_L_14_336

logger = logging.getLogger(__name__)

SIZES: dict[str, dict[str, Any]] = {
    # The architectures of MobileVLM 1.7B / 3B (CLIP ViT-L/14-336 + LDPv2 + MobileLLaMA 1.4B / 2.7B).
    "1.7b": dict(vision=CLIP_VIT_L_14_336, llm=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                                            num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)),
    "3b": dict(vision=CLIP_VIT_L_14_336, llm=dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32,
                                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)),
    # A smoke-test size: the same machinery in seconds.
    "tiny": dict(vision=dict(CLIP_VIT_L_14_336, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
                 llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)),
}
FIRST_QUESTION = "What is in the image? Describe the scene in detail."
SECOND_QUESTION = "What colour is the largest object?"
BASELINES = ("reference", "llamacpp-plain")
CHECKPOINT_FORMAT = 1  # bump when the written bench checkpoint changes


@dataclass(frozen=True)
class BenchOptions:
    size: str = "1.7b"
    model: str | None = None  # a checkpoint directory instead of a random model of `size`
    language: str = "llamacpp"
    quant: str = "q4_k_s"
    vs: tuple[str, ...] = ()
    new_tokens: int = 64
    repeats: int = 3
    device: str = "cpu"
    vision_dtype: str = "float32"  # torch dtype of our pipeline's vision tower and projector (and LLM, with torch)
    vision: str = "torch"  # our vision backend; with any other, torch eager's vision step is timed beside it
    vision_precision: str = "auto"  # of a non-torch vision backend (choices.VISION_PRECISIONS; auto: its default)
    work_dir: str = str(Path.home() / ".cache" / "mobilevlm_ros" / "bench")
    engines_dir: str | None = None  # default: <work_dir>/engines for random models, the package's engines/ for --model
    tiles: int = 0  # > 0: also time `tiles` mode with this tile budget on a TILES_FRAME-sized frame
    llama_amx: bool | None = None  # llama.cpp's AMX buffer type, for ours and llamacpp-plain alike (None: by the CPU)


@dataclass
class BenchResult:
    options: BenchOptions
    machine: dict[str, Any]
    model_dir: str
    gguf: dict[str, Any] | None = None
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_bench(options: BenchOptions) -> BenchResult:
    """Prepare the model (and GGUF), time each pipeline in its own process, and compute the ratios."""
    if options.size not in SIZES and options.model is None:
        raise ValueError(f"unknown size {options.size!r} (expected {', '.join(SIZES)})")
    unknown = set(options.vs) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)} (expected {', '.join(BASELINES)})")
    work_dir = Path(options.work_dir)
    if options.model is not None:
        model_dir = Path(options.model)
    else:
        model_dir = _in_fresh_process(write_random_checkpoint, work_dir / f"{options.size}-random-v{CHECKPOINT_FORMAT}", options.size)
    engines_dir = options.engines_dir or (None if options.model is not None else str(work_dir / "engines"))
    result = BenchResult(options, machine_info(), str(model_dir))
    if options.language == "llamacpp" or "llamacpp-plain" in options.vs:
        result.gguf = _in_fresh_process(build_gguf, str(model_dir), options.quant, engines_dir)
    precision = vision_precision(options.vision, options.vision_precision)
    vision = "" if options.vision == "torch" else f", {options.vision} {precision} vision"
    ours = f"ours ({options.language} " + (options.quant if options.language == "llamacpp" else options.vision_dtype) + f"{vision})"
    with ExitStack() as stack:
        group = {ours: stack.enter_context(_Worker(setup_ours, str(model_dir), options, engines_dir))}
        if "llamacpp-plain" in options.vs:
            prompt_tokens = group[ours].run(min(4, options.new_tokens))["prompt_tokens"]  # its warm-up
            group[f"llama-cpp-python plain ({options.quant})"] = stack.enter_context(
                _Worker(setup_llamacpp_plain, str(model_dir), result.gguf["path"], prompt_tokens, options.llama_amx)
            )
        if options.vision != "torch":
            torch_vision = _Worker(setup_torch_vision, str(model_dir), options)
            group[f"torch eager vision ({options.vision_dtype})"] = stack.enter_context(torch_vision)
        result.pipelines |= _alternate(group, options)
    if "reference" in options.vs:
        with _Worker(setup_reference, str(model_dir), options) as reference:
            result.pipelines |= _alternate({"reference (transformers)": reference}, options)
    result.ratios = ratios(result.pipelines, ours)
    return result


def _in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


Run = Callable[[int], dict[str, float]]


class _Worker:
    """A pipeline loaded in a process of its own, timed one run at a time on request."""

    def __init__(self, setup: Callable[..., tuple[Run, dict[str, Any]]], *args: Any):
        context = get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, setup, args), daemon=True)
        self._process.start()
        child.close()
        self.info: dict[str, Any] = self._receive()
        self.warm = False

    def run(self, new_tokens: int) -> dict[str, float]:
        self._connection.send(new_tokens)
        self.warm = True
        return self._receive()

    def finish(self) -> dict[str, float]:
        """Stop the process; its peak memory."""
        self._connection.send(None)
        memory = self._receive()
        self._process.join()
        return memory

    def _receive(self) -> Any:
        try:
            status, value = self._connection.recv()
        except EOFError:
            self._process.join()
            code = self._process.exitcode
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            raise RuntimeError(f"a benchmark pipeline's process died ({how}) before it answered") from None
        if status == "error":
            raise RuntimeError(f"a benchmark pipeline failed in its process:\n{value}")
        return value

    def __enter__(self) -> "_Worker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()


def _serve(connection: Connection, setup: Callable[..., tuple[Run, dict[str, Any]]], args: tuple[Any, ...]) -> None:
    """A worker process: load the pipeline, then answer each requested token count with one timed run."""
    try:
        run, info = setup(*args)
        connection.send(("ok", info))
        while (new_tokens := connection.recv()) is not None:
            connection.send(("ok", run(new_tokens)))
        connection.send(("ok", _peak_memory()))
    except Exception:
        connection.send(("error", traceback.format_exc()))


def _alternate(workers: dict[str, _Worker], options: BenchOptions) -> dict[str, dict[str, Any]]:
    """A short warm-up run each, then `repeats` rounds in which every pipeline runs once; medians per pipeline."""
    for worker in workers.values():
        if not worker.warm:
            worker.run(min(4, options.new_tokens))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
    for _ in range(options.repeats):
        for name, worker in workers.items():
            runs[name].append(worker.run(options.new_tokens))
    return {
        name: worker.info | {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]} | worker.finish()
        for name, worker in workers.items()
    }


def _peak_memory() -> dict[str, float]:
    import torch

    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def machine_info() -> dict[str, Any]:
    """Where the figures were taken: the CPU, its features that change the kernels, the library versions."""
    import torch

    from mobilevlm_ros.cpu import RELEVANT_FLAGS, cpu_info

    cpu = cpu_info()
    info = {"cpu": cpu.model, "cpus": cpu.cpus, "cores": cpu.cores, "cpu_flags": [f for f in RELEVANT_FLAGS if f in cpu.flags],
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return info


# --- the random checkpoint -------------------------------------------------------------------------------------------

def write_random_checkpoint(directory: Path, size: str) -> Path:
    """A checkpoint of `size`'s architecture with random fp16 weights, written once and reused (seeded, so identical)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import CLIPVisionConfig
    from transformers.initialization import no_init_weights

    from mobilevlm_ros.model.config import parse_config
    from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM
    from mobilevlm_ros.model.writer import LLAMA, checkpoint_config, write_checkpoint, write_tokenizer

    spec = SIZES[size]
    started = time.perf_counter()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # The tower directory holds only its config: the weights are stored in the checkpoint, as MobileVLM V2 does.
    config = checkpoint_config({**LLAMA, "tie_word_embeddings": False, **spec["llm"]}, "vision_tower", "ldpnetv2", spec["vision"]["hidden_size"])
    write_tokenizer(partial / "tokenizer.model", random_sentences(), spec["llm"]["vocab_size"])

    with torch.device("meta"), no_init_weights():
        skeleton = MobileLlamaForCausalLM(parse_config(config, partial / "config.json"), CLIPVisionConfig(**spec["vision"]))
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for key, meta in skeleton.state_dict().items():
        if meta.ndim == 1:  # norms scale by 1, biases start at 0
            weights[key] = (torch.ones if "norm" in key and key.endswith("weight") else torch.zeros)(meta.shape, dtype=torch.float16)
        else:
            weights[key] = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.float16)
    write_checkpoint(partial, config, spec["vision"], weights)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    logger.info("wrote a random %s checkpoint to %s in %.0f s", size, directory, time.perf_counter() - started)
    return directory


def random_sentences() -> list[str]:
    """The tokenizer's corpus: generated words, on which sentencepiece reaches 32000 pieces in seconds, so the 1.7B/3B
    bench uses LLaMA's vocabulary size (smaller sizes get what the corpus gives)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(60000)]
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]


def build_gguf(model_dir: str, quant: str, engines_dir: str | None) -> dict[str, Any]:
    from mobilevlm_ros.export.gguf import llm_gguf_artifact

    artifact = llm_gguf_artifact(model_dir, quant, engines_dir)
    return {"path": str(artifact.path), "size_mb": artifact.manifest["size"] / 1e6, "built_now": artifact.built,
            "build_s": artifact.manifest["build_seconds"], "tensor_types": artifact.manifest["details"].get("tensor_types")}


# --- the timed pipelines (each in its own process) ------------------------------------------------------------------

TILES_FRAME = (1920, 1080)  # width, height: the high-resolution camera frame `--tiles` cuts


def bench_frame(size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """A camera-sized frame with some structure."""
    image = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image[120:360, 200:440] = (200, 40, 40)
    return image


def answer_metrics(
    t0: float, t1: float, t2: float, first: list[float], t3: float, second: list[float], prompt_tokens: int
) -> dict[str, float]:
    """One image -> answer run from its clock readings: start, preprocessed, encoded, the first answer's token times,
    the second question's start and token times."""
    return {
        "preprocess_ms": (t1 - t0) * 1e3,
        "vision_ms": (t2 - t1) * 1e3,
        "prefill_tok_s": prompt_tokens / (first[0] - t2),
        "ttft_s": first[0] - t0,
        "decode_tok_s": (len(first) - 1) / (first[-1] - first[0]),
        "answer_s": first[-1] - t0,
        "second_ttft_s": second[0] - t3,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": len(first),
    }


def setup_ours(model_dir: str, options: BenchOptions, engines_dir: str | None) -> tuple[Run, dict[str, Any]]:
    """Our pipeline: a session per frame; the first question pays for vision and the prefix, the second reuses them."""
    import torch

    from mobilevlm_ros.runtime.sampling import SamplingParams
    from mobilevlm_ros.runtime.session import Session
    from mobilevlm_ros.runtime.vlm import MobileVLM

    started = time.perf_counter()
    vlm = MobileVLM.from_pretrained(
        model_dir, device=options.device, dtype=getattr(torch, options.vision_dtype), language=options.language,
        quant=options.quant, engines_dir=engines_dir, vision=options.vision, vision_precision=options.vision_precision,
    )
    load_s = time.perf_counter() - started
    image = bench_frame()
    tile_views = vlm.views(bench_frame(TILES_FRAME), "tiles", max_tiles=options.tiles) if options.tiles else None

    def run(new_tokens: int) -> dict[str, float]:
        params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pixels = vlm.image_processor(image).unsqueeze(0)
            t1 = _sync(time.perf_counter())
            embeds = vlm.vision(pixels)[0]
            t2 = _sync(time.perf_counter())
        session = Session(vlm.language, vlm.tokenizer, embeds)
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
        with torch.inference_mode():
            pixels = vlm.image_processor.batch(tile_views.images)
            t1 = _sync(time.perf_counter())
            embeds = vlm.vision(pixels)
            t2 = _sync(time.perf_counter())
        session = Session(vlm.language, vlm.tokenizer, embeds, image_text=tile_views.image_text)
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
    import torch

    from mobilevlm_ros.model.checkpoint import load_checkpoint

    dtype = getattr(torch, options.vision_dtype)
    started = time.perf_counter()
    checkpoint = load_checkpoint(model_dir, dtype=dtype, device=options.device, with_language_model=False)
    load_s = time.perf_counter() - started
    pixels = checkpoint.image_processor(bench_frame()).unsqueeze(0).to(options.device, dtype)

    def run(new_tokens: int) -> dict[str, float]:
        with torch.inference_mode():
            started = _sync(time.perf_counter())
            checkpoint.model.vision_path(pixels)
            return {"vision_ms": (_sync(time.perf_counter()) - started) * 1e3}

    return run, {"pipeline": f"torch eager tower + projector, {options.vision_dtype}", "load_s": load_s,
                 "vision_threads": torch.get_num_threads()}


def setup_reference(model_dir: str, options: BenchOptions) -> tuple[Run, dict[str, Any]]:
    """The plain transformers path: no sessions; the second question re-prefills the whole prompt (the frame's
    features are reused, so it is spared the vision pass)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from mobilevlm_ros.runtime.vlm import MobileVLM

    class StepTimes(LogitsProcessor):
        """Called once per generated token, right after its forward pass."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(_sync(time.perf_counter()))
            return scores

    started = time.perf_counter()
    vlm = MobileVLM.from_pretrained(model_dir, device=options.device)
    load_s = time.perf_counter() - started
    model = vlm.language.model
    image = bench_frame()
    eos = vlm.tokenizer.eos_id

    def generate(question: str, image_embeds: torch.Tensor, new_tokens: int) -> tuple[list[float], int]:
        ids = vlm.prompt_ids(question)
        inputs = model.embed_with_images(ids, image_embeds)
        timer = StepTimes()
        model.generate(
            inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
            logits_processor=LogitsProcessorList([timer]),
        )
        return timer.times, inputs.shape[1]

    def run(new_tokens: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            pixels = vlm.image_processor(image).unsqueeze(0)
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

    from mobilevlm_ros.model.prompt import load_tokenizer, prefix_ids, question_ids
    from mobilevlm_ros.cpu import physical_cores
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
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
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


def _token_times(tokens: Any) -> list[float]:
    return [time.perf_counter() for _ in tokens]


def _sync(now: float) -> float:
    """A timestamp after the GPU's queued work is done (the same timestamp on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        return time.perf_counter()
    return now


# --- results ---------------------------------------------------------------------------------------------------------

def ratios(pipelines: dict[str, dict[str, Any]], ours: str) -> dict[str, dict[str, Any]]:
    """The issue's targets as measured ratios (present when the compared pipelines ran)."""
    mine = pipelines[ours]
    found: dict[str, dict[str, Any]] = {
        "second-question TTFT / first": {"value": mine["second_ttft_s"] / mine["ttft_s"], "target": "<= 0.25",
                                          "met": mine["second_ttft_s"] / mine["ttft_s"] <= 0.25},
        "peak RSS (GB)": {"value": mine["peak_rss_mb"] / 1024, "target": "<= 2.5", "met": mine["peak_rss_mb"] / 1024 <= 2.5},
    }
    for name, other in pipelines.items():
        if name.startswith("reference"):
            speedup = other["answer_s"] / mine["answer_s"]
            found["image -> answer speed-up vs reference"] = {"value": speedup, "target": ">= 3", "met": speedup >= 3}
        elif name.startswith("llama-cpp-python plain"):
            share = mine["decode_tok_s"] / other["decode_tok_s"]
            found["decode tok/s vs llama-cpp-python plain"] = {"value": share, "target": ">= 0.95", "met": share >= 0.95}
        elif name.startswith("torch eager vision"):
            speedup = other["vision_ms"] / mine["vision_ms"]
            found["vision speed-up vs torch eager"] = {"value": speedup, "target": ">= 1.3", "met": speedup >= 1.3}
    return found


ROWS = (
    ("load_s", "load (s)", "{:.1f}"),
    ("preprocess_ms", "preprocessing (ms)", "{:.1f}"),
    ("vision_ms", "vision + projector (ms)", "{:.0f}"),
    ("vision_threads", "vision threads", "{:.0f}"),
    ("prompt_tokens", "prompt tokens", "{:.0f}"),
    ("prefill_tok_s", "prefill (tok/s)", "{:.1f}"),
    ("ttft_s", "time to first token (s)", "{:.2f}"),
    ("decode_tok_s", "decode (tok/s)", "{:.2f}"),
    ("generated_tokens", "generated tokens", "{:.0f}"),
    ("answer_s", "image -> answer (s)", "{:.2f}"),
    ("second_ttft_s", "2nd question TTFT, same frame (s)", "{:.3f}"),
    ("tiles", "tiles mode: tiles of a 1920x1080 frame", "{:.0f}"),
    ("tiles_vision_ms", "tiles mode: vision + projector, overview + tiles (ms)", "{:.0f}"),
    ("tiles_prompt_tokens", "tiles mode: prompt tokens", "{:.0f}"),
    ("tiles_ttft_s", "tiles mode: time to first token (s)", "{:.2f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ("peak_gpu_mb", "peak GPU memory (MB)", "{:.0f}"),
)


def markdown(result: BenchResult) -> str:
    options = result.options
    names = list(result.pipelines)
    lines = [
        f"MobileVLM bench: {options.model or options.size + ' (random weights)'}, {options.new_tokens} new tokens, "
        f"median of {options.repeats}",
        "",
        f"CPU: {result.machine['cpu']}, {result.machine['cpus']} CPUs ({result.machine.get('cores', '?')} cores); "
        f"{' '.join(result.machine.get('cpu_flags', [])) or 'no AVX2/AVX-512/AMX'}"
        + (f"; GPU: {result.machine['gpu']}" if "gpu" in result.machine else ""),
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key, label, fmt in ROWS:
        if any(key in result.pipelines[name] for name in names):
            cells = [fmt.format(result.pipelines[name][key]) if key in result.pipelines[name] else "-" for name in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result.gguf:
        gguf = result.gguf
        lines += ["", f"GGUF: {Path(gguf['path']).name}, {gguf['size_mb']:.0f} MB, "
                      f"{'built now' if gguf['built_now'] else 'cached'} (build {gguf['build_s']:.1f} s), tensors {gguf['tensor_types']}"]
    for name in names:
        if buffers := result.pipelines[name].get("llama_cpp_buffers"):
            lines += ["", f"llama.cpp weights, {name}: " + ", ".join(f"{kind} {mib:.0f} MiB" for kind, mib in buffers.items())]
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---|---|"]
    for name, ratio in result.ratios.items():
        lines.append(f"| {name} | {ratio['value']:.3f} | {ratio['target']} | {'yes' if ratio['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def to_json(result: BenchResult) -> str:
    return json.dumps(asdict(result), indent=2) + "\n"
