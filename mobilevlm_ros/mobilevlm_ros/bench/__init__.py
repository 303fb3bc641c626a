"""`mobilevlm bench`: the whole pipeline (camera frame -> answer) of a MobileVLM of real dimensions, against baselines.

With `--size 1.7b` or `3b` the bench writes a checkpoint of that architecture with random weights (no download) in the
official on-disk format, so the same loader, GGUF export and sessions run as for a real model; `--model DIR` takes a
real checkpoint instead. Random weights make the answers meaningless but the work identical, and every answer is forced
to `new_tokens` tokens (EOS suppressed) so the pipelines compare equal work.

Each pipeline is loaded in a process of its own, so its peak RSS is its own (the checkpoint writer and the GGUF build,
which hold the fp16 weights in memory, run in processes of their own too). After a warm-up run each, the pipelines
whose speeds are compared run in turn, run by run (ours, llamacpp-plain, llamacpp-mtmd and torch eager vision
alternate), so a shared machine whose speed drifts affects them alike; the slow reference runs on its own afterwards.
Medians are reported.
- ours: `MobileVLM` sessions on the chosen language backend: a frame is encoded and [system + image] prefilled once,
  then each question prefills only itself; the second question reuses the frame.
- reference (`--vs reference`): the plain transformers path, torch vision and projector then
  `LlamaForCausalLM.generate(inputs_embeds=..., do_sample=False, min_new_tokens=max_new_tokens=N)` on the whole prompt.
- llamacpp-plain (`--vs llamacpp-plain`): llama-cpp-python's own `Llama.generate` on the same GGUF file, greedy, with a
  text-only prompt of the same token count (no image path exists there); it shows what our ctypes driving costs.
- llamacpp-mtmd (`--vs llamacpp-mtmd`): llama.cpp's own image pipeline, mtmd on the checkpoint's mmproj GGUF and the
  same GGUF, image -> answer through the C API as llama-mtmd-cli drives it (llamacpp_mtmd.py); mtmd keeps nothing
  between prompts, so the second question is timed in a new conversation and with llama-server's prompt cache.
- torch eager vision (with `--vision onnxruntime|tensorrt|ggml`): our vision step, tower + projector on the same frame, in
  torch with `--vision-dtype` and as many threads as our backend, for the "vision speed-up vs torch eager" ratio.

The modules: random_model (the checkpoint), harness (a pipeline per process, timed in turn), workload (the frame, the
questions, the figures of a run), pipelines and llamacpp_mtmd (what each pipeline runs and times), report (the ratios
against their targets, Markdown, JSON), plot (the chart), run (all of it in order).
This module holds what they share: the options of a run and its result.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    mmproj: dict[str, Any] | None = None  # the vision GGUF llama.cpp's mtmd runs (with --vs llamacpp-mtmd)
